//! DPDK lcore list syntax, as EAL's `-l` and `--lcores` take it.
//!
//! `-l`: `0-3,5` (ids and ranges). `--lcores`: comma-separated elements, each an lcore set
//! optionally mapped to a cpu set: `1`, `0-3`, `(0-3)@0`, `1@2`, `(4,5)@(6-7)`. Both are parsed
//! into the set of lcore ids so hostplane can validate its config against them.

use std::collections::BTreeSet;

/// DPDK's compile-time lcore limit (RTE_MAX_LCORE in Debian's build).
pub const MAX_LCORE: u32 = 128;

/// Why an lcore list was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad lcore list {input:?}: {reason}")]
pub struct LcoreListError {
    /// The text given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

fn err(input: &str, reason: impl Into<String>) -> LcoreListError {
    LcoreListError {
        input: input.to_string(),
        reason: reason.into(),
    }
}

fn parse_id(input: &str, s: &str) -> Result<u32, LcoreListError> {
    let t = s.trim();
    let v: u32 = t
        .parse()
        .map_err(|_| err(input, format!("{t:?} is not an lcore number")))?;
    if v >= MAX_LCORE {
        return Err(err(
            input,
            format!("lcore {v} is not below the limit {MAX_LCORE}"),
        ));
    }
    Ok(v)
}

/// Parses a plain list `0-3,5` (no groups) into ids.
fn parse_simple(input: &str, s: &str, out: &mut BTreeSet<u32>) -> Result<(), LcoreListError> {
    if s.trim().is_empty() {
        return Err(err(input, "empty element"));
    }
    for part in s.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(err(input, "empty element"));
        }
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (parse_id(input, a)?, parse_id(input, b)?);
                if a > b {
                    return Err(err(input, format!("range {a}-{b} runs backwards")));
                }
                out.extend(a..=b);
            }
            None => {
                out.insert(parse_id(input, part)?);
            }
        }
    }
    Ok(())
}

/// Parses the `-l` form: `0-3,5`.
pub fn parse_lcore_list(s: &str) -> Result<BTreeSet<u32>, LcoreListError> {
    let mut out = BTreeSet::new();
    if s.contains(['(', ')', '@']) {
        return Err(err(s, "groups and @ belong to --lcores, not -l"));
    }
    parse_simple(s, s, &mut out)?;
    Ok(out)
}

/// One element of a `--lcores` map: these lcores run on these cpus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LcoreMapping {
    /// Lcore ids of the element.
    pub lcores: BTreeSet<u32>,
    /// CPUs they float on (same as the lcores when no `@` is given).
    pub cpus: BTreeSet<u32>,
}

/// Splits at top-level commas (not inside parentheses).
fn split_top(input: &str) -> Result<Vec<&str>, LcoreListError> {
    let mut depth = 0i32;
    let mut start = 0;
    let mut parts = Vec::new();
    for (i, c) in input.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(err(input, "unbalanced ')'"));
                }
            }
            ',' if depth == 0 => {
                parts.push(&input[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(err(input, "unbalanced '('"));
    }
    parts.push(&input[start..]);
    Ok(parts)
}

fn parse_group(input: &str, s: &str) -> Result<BTreeSet<u32>, LcoreListError> {
    let s = s.trim();
    let inner = match s.strip_prefix('(') {
        Some(rest) => rest
            .strip_suffix(')')
            .ok_or_else(|| err(input, format!("{s:?} lacks ')'")))?,
        None => s,
    };
    if inner.contains(['(', ')']) {
        return Err(err(input, "nested parentheses"));
    }
    let mut out = BTreeSet::new();
    parse_simple(input, inner, &mut out)?;
    Ok(out)
}

/// Parses the `--lcores` form: `(0-3)@0,4@(5-6),7`.
pub fn parse_lcore_map(s: &str) -> Result<Vec<LcoreMapping>, LcoreListError> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for el in split_top(s)? {
        let el = el.trim();
        if el.is_empty() {
            return Err(err(s, "empty element"));
        }
        let (l, c) = match el.split_once('@') {
            Some((l, c)) => (l, Some(c)),
            None => (el, None),
        };
        let lcores = parse_group(s, l)?;
        let cpus = match c {
            Some(c) => parse_group(s, c)?,
            None => lcores.clone(),
        };
        for id in &lcores {
            if !seen.insert(*id) {
                return Err(err(s, format!("lcore {id} appears twice")));
            }
        }
        out.push(LcoreMapping { lcores, cpus });
    }
    Ok(out)
}

/// All lcore ids of a `--lcores` map.
pub fn lcores_of_map(map: &[LcoreMapping]) -> BTreeSet<u32> {
    map.iter().flat_map(|m| m.lcores.iter().copied()).collect()
}

/// Formats ids back into `-l` syntax with ranges: {0,1,2,5} → "0-2,5".
pub fn format_lcore_list(ids: &BTreeSet<u32>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut it = ids.iter().copied().peekable();
    while let Some(start) = it.next() {
        let mut end = start;
        while it.peek() == Some(&(end + 1)) {
            end += 1;
            it.next();
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[u32]) -> BTreeSet<u32> {
        v.iter().copied().collect()
    }

    #[test]
    fn lists() {
        assert_eq!(parse_lcore_list("0-3,5").unwrap(), set(&[0, 1, 2, 3, 5]));
        assert_eq!(parse_lcore_list("7").unwrap(), set(&[7]));
        assert_eq!(parse_lcore_list(" 1 , 2 ").unwrap(), set(&[1, 2]));
        for bad in [
            "", "a", "3-1", "1,,2", "0-", "-1", "128", "(0-1)@0", "1-2-3",
        ] {
            assert!(parse_lcore_list(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn maps() {
        let m = parse_lcore_map("(0-3)@0").unwrap();
        assert_eq!(
            m,
            vec![LcoreMapping {
                lcores: set(&[0, 1, 2, 3]),
                cpus: set(&[0])
            }]
        );
        let m = parse_lcore_map("0,(1-2)@(3-4),5@1").unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].cpus, set(&[3, 4]));
        assert_eq!(lcores_of_map(&m), set(&[0, 1, 2, 5]));
        for bad in ["(0-1", "0-1)", "((1))", "1@", "1,1", "(0-1)@(x)", ""] {
            assert!(parse_lcore_map(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn format_roundtrip() {
        for s in ["0-2,5", "1", "0,2,4", "3-9"] {
            assert_eq!(format_lcore_list(&parse_lcore_list(s).unwrap()), s);
        }
    }
}
