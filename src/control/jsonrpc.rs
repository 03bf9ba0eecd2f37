//! JSON-RPC 2.0 request validation, dispatch and response objects. Pure (no sockets), so every
//! error path is unit-tested.

use super::registry::Registry;
use serde_json::{json, Map, Value};

/// Invalid JSON.
pub const PARSE_ERROR: i32 = -32700;
/// Not a valid request object.
pub const INVALID_REQUEST: i32 = -32600;
/// No such method (or not available in this build yet).
pub const METHOD_NOT_FOUND: i32 = -32601;
/// Missing or wrong parameter; the message names it.
pub const INVALID_PARAMS: i32 = -32602;
/// The method failed for a reason that is not the caller's input.
pub const INTERNAL_ERROR: i32 = -32603;

/// An error answer: code, message and optional data.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{message} (code {code})")]
pub struct RpcError {
    /// JSON-RPC error code.
    pub code: i32,
    /// Human-readable message.
    pub message: String,
    /// Extra structured detail.
    pub data: Option<Value>,
}

impl RpcError {
    /// An error with `code` and `message`.
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
            data: None,
        }
    }
    /// -32600.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(INVALID_REQUEST, message)
    }
    /// -32601 for `method`.
    pub fn method_not_found(method: &str) -> Self {
        Self::new(METHOD_NOT_FOUND, format!("Method not found: {method}"))
    }
    /// -32602; the message should start with the parameter's name (`entries[2].ip: ...`).
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(INVALID_PARAMS, message)
    }
    /// -32603.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(INTERNAL_ERROR, message)
    }
    /// The `error` member of a response.
    pub fn to_value(&self) -> Value {
        let mut e = json!({"code": self.code, "message": self.message});
        if let Some(d) = &self.data {
            e["data"] = d.clone();
        }
        e
    }
}

/// A success response.
pub fn response(id: Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

/// An error response.
pub fn error_response(id: Value, err: &RpcError) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": err.to_value()})
}

/// Checks one request object and runs it. Returns the response, or `None` for a notification
/// (a request without `id`), which gets no answer even when it fails (JSON-RPC 2.0 §4.1).
pub fn handle_request(registry: &Registry, req: Value) -> Option<Value> {
    let Value::Object(mut obj) = req else {
        return Some(error_response(
            Value::Null,
            &RpcError::invalid_request("Invalid request: expected an object"),
        ));
    };
    let id = match obj.remove("id") {
        None => None,
        Some(id @ (Value::Null | Value::Number(_) | Value::String(_))) => Some(id),
        Some(_) => {
            return Some(error_response(
                Value::Null,
                &RpcError::invalid_request("Invalid request: id must be a string, number or null"),
            ))
        }
    };
    match check(&mut obj) {
        Err(e) => id
            .map(|id| error_response(id, &e))
            .or_else(|| Some(error_response(Value::Null, &e))),
        Ok((method, params)) => {
            let r = registry.call(&method, params);
            let id = id?;
            Some(match r {
                Ok(v) => response(id, v),
                Err(e) => error_response(id, &e),
            })
        }
    }
}

fn check(obj: &mut Map<String, Value>) -> Result<(String, Value), RpcError> {
    match obj.get("jsonrpc") {
        Some(Value::String(v)) if v == "2.0" => {}
        _ => {
            return Err(RpcError::invalid_request(
                "Invalid request: jsonrpc must be \"2.0\"",
            ))
        }
    }
    let method = match obj.remove("method") {
        Some(Value::String(m)) => m,
        _ => {
            return Err(RpcError::invalid_request(
                "Invalid request: method must be a string",
            ))
        }
    };
    let params = match obj.remove("params") {
        None => Value::Null,
        Some(p @ (Value::Object(_) | Value::Array(_) | Value::Null)) => p,
        Some(_) => {
            return Err(RpcError::invalid_request(
                "Invalid request: params must be an object or an array",
            ))
        }
    };
    Ok((method, params))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg() -> Registry {
        let mut r = Registry::new();
        r.register("echo", Ok);
        r
    }

    fn code(v: &Option<Value>) -> i64 {
        v.as_ref().unwrap()["error"]["code"].as_i64().unwrap()
    }

    #[test]
    fn good_requests_and_notifications() {
        let r = reg();
        let out = handle_request(
            &r,
            json!({"jsonrpc": "2.0", "id": 3, "method": "echo", "params": {"a": 1}}),
        )
        .unwrap();
        assert_eq!(out, json!({"jsonrpc": "2.0", "id": 3, "result": {"a": 1}}));
        let out =
            handle_request(&r, json!({"jsonrpc": "2.0", "id": "x", "method": "echo"})).unwrap();
        assert_eq!(out["result"], Value::Null);
        assert_eq!(
            handle_request(&r, json!({"jsonrpc": "2.0", "method": "echo"})),
            None
        );
        assert_eq!(
            handle_request(&r, json!({"jsonrpc": "2.0", "method": "nope"})),
            None,
            "notifications get no error either"
        );
    }

    #[test]
    fn error_codes() {
        let r = reg();
        assert_eq!(code(&handle_request(&r, json!([1]))), -32600);
        assert_eq!(
            code(&handle_request(&r, json!({"id": 1, "method": "echo"}))),
            -32600
        );
        assert_eq!(
            code(&handle_request(
                &r,
                json!({"jsonrpc": "1.0", "id": 1, "method": "echo"})
            )),
            -32600
        );
        assert_eq!(
            code(&handle_request(
                &r,
                json!({"jsonrpc": "2.0", "id": 1, "method": 5})
            )),
            -32600
        );
        assert_eq!(
            code(&handle_request(
                &r,
                json!({"jsonrpc": "2.0", "id": {}, "method": "echo"})
            )),
            -32600
        );
        assert_eq!(
            code(&handle_request(
                &r,
                json!({"jsonrpc": "2.0", "id": 1, "method": "echo", "params": 3})
            )),
            -32600
        );
        let out = handle_request(&r, json!({"jsonrpc": "2.0", "id": 9, "method": "nope"}));
        assert_eq!(code(&out), -32601);
        assert_eq!(out.unwrap()["id"], json!(9));
        // An invalid request without id is still answered (with id null): it may not be a
        // notification at all.
        let out = handle_request(&r, json!({"jsonrpc": "2.0"}));
        assert_eq!(code(&out), -32600);
    }
}
