//! `hostplane rpc`: a minimal JSON-RPC client for the control socket.
//!
//! `hostplane rpc [-s SOCK] METHOD [--name value ...]` builds the params object from
//! `--name value` pairs (`-` in names becomes `_`; values that parse as JSON — numbers, bools,
//! null, arrays, objects, quoted strings — are taken as such, anything else is a string; a
//! flag without a value is `true`; a repeated name makes a list). `--json '{...}'` sends a
//! request (or batch) as given. The result is printed as pretty JSON; an error goes to stderr
//! and the exit status is non-zero.

use super::stream::JsonStream;
use serde_json::{json, Map, Value};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Largest response accepted (a `save_config` of a big table is large).
const MAX_RESPONSE: usize = 1 << 30;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad command-line params.
    #[error("{0}")]
    Usage(String),
    /// Socket trouble.
    #[error("{path}: {err}")]
    Io {
        /// Socket path.
        path: String,
        /// Cause.
        err: std::io::Error,
    },
    /// The server sent something that is not a response.
    #[error("bad response: {0}")]
    Protocol(String),
    /// The server answered with an error.
    #[error("{message} (JSON-RPC error {code}){}", data.as_ref().map(|d| format!(": {d}")).unwrap_or_default())]
    Rpc {
        /// Code.
        code: i64,
        /// Message.
        message: String,
        /// Data, if any.
        data: Option<Value>,
    },
}

/// Builds params from `--name value` pairs.
pub fn params_from_args(args: &[String]) -> Result<Value, ClientError> {
    let mut m = Map::new();
    let mut i = 0;
    while i < args.len() {
        let Some(name) = args[i].strip_prefix("--").filter(|n| !n.is_empty()) else {
            return Err(ClientError::Usage(format!(
                "unexpected {:?}: params are given as --name value",
                args[i]
            )));
        };
        let name = name.replace('-', "_");
        let value = match args.get(i + 1) {
            Some(v) if !v.starts_with("--") => {
                i += 2;
                match serde_json::from_str::<Value>(v) {
                    Ok(j) => j,
                    Err(_) => Value::String(v.clone()),
                }
            }
            _ => {
                i += 1;
                Value::Bool(true)
            }
        };
        match m.get_mut(&name) {
            None => {
                m.insert(name, value);
            }
            Some(Value::Array(list)) if !value.is_array() => list.push(value),
            Some(prev) => *prev = json!([prev.take(), value]),
        }
    }
    Ok(Value::Object(m))
}

/// Sends one request (or batch) and returns the raw response value.
pub fn call_raw(socket: &Path, request: &Value, timeout: Duration) -> Result<Value, ClientError> {
    let io = |err| ClientError::Io {
        path: socket.display().to_string(),
        err,
    };
    let mut s = UnixStream::connect(socket).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    let bytes = serde_json::to_vec(request).map_err(|e| ClientError::Usage(e.to_string()))?;
    s.write_all(&bytes).map_err(io)?;
    let deadline = Instant::now() + timeout;
    let mut js = JsonStream::new(MAX_RESPONSE);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no response",
            )));
        }
        s.set_read_timeout(Some(left)).map_err(io)?;
        let n = s.read(&mut buf).map_err(io)?;
        if n == 0 {
            return match js.finish() {
                Some(r) => r.map_err(|e| ClientError::Protocol(e.to_string())),
                None => Err(ClientError::Protocol(
                    "connection closed without a response".into(),
                )),
            };
        }
        js.feed(&buf[..n]);
        if let Some(r) = js.next_value() {
            return r.map_err(|e| ClientError::Protocol(e.to_string()));
        }
    }
}

/// Calls `method` and returns its result, or the server's error.
pub fn call(
    socket: &Path,
    method: &str,
    params: Value,
    timeout: Duration,
) -> Result<Value, ClientError> {
    let mut req = json!({"jsonrpc": "2.0", "id": 1, "method": method});
    if !params.is_null() {
        req["params"] = params;
    }
    result_of(call_raw(socket, &req, timeout)?)
}

/// The result of a single response, or its error.
pub fn result_of(mut resp: Value) -> Result<Value, ClientError> {
    if let Some(e) = resp.get("error") {
        return Err(ClientError::Rpc {
            code: e["code"].as_i64().unwrap_or(0),
            message: e["message"].as_str().unwrap_or("").to_string(),
            data: e.get("data").cloned(),
        });
    }
    match resp.get_mut("result") {
        Some(r) => Ok(r.take()),
        None => Err(ClientError::Protocol(format!(
            "neither result nor error in {resp}"
        ))),
    }
}

/// `hostplane rpc`: prints the result as pretty JSON.
pub fn run(
    socket: &Path,
    method: Option<&str>,
    params: &[String],
    raw: Option<&str>,
    timeout: Duration,
) -> Result<(), ClientError> {
    let out = match (method, raw) {
        (Some(m), None) => call(socket, m, params_from_args(params)?, timeout)?,
        (None, Some(text)) => {
            if !params.is_empty() {
                return Err(ClientError::Usage(
                    "--json takes the whole request; no other params".into(),
                ));
            }
            let mut req: Value = serde_json::from_str(text)
                .map_err(|e| ClientError::Usage(format!("--json: {e}")))?;
            if let Value::Object(o) = &mut req {
                o.entry("jsonrpc").or_insert(json!("2.0"));
                o.entry("id").or_insert(json!(1));
            }
            let resp = call_raw(socket, &req, timeout)?;
            if req.is_array() {
                resp
            } else {
                result_of(resp)?
            }
        }
        _ => return Err(ClientError::Usage("give a METHOD or --json '{...}'".into())),
    };
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn params_are_typed() {
        let p = params_from_args(&args(&[
            "--ip",
            "10.0.0.2",
            "--num-blocks",
            "64",
            "--readonly",
            "--name",
            "\"0012\"",
            "--ips",
            "a",
            "--ips",
            "b",
            "--x",
            "[1]",
            "--neg",
            "-5",
        ]))
        .unwrap();
        assert_eq!(
            p,
            json!({"ip": "10.0.0.2", "num_blocks": 64, "readonly": true, "name": "0012", "ips": ["a", "b"], "x": [1], "neg": -5})
        );
        assert!(params_from_args(&args(&["stray"])).is_err());
        assert_eq!(params_from_args(&[]).unwrap(), json!({}));
    }
}
