//! `${VAR}` and `${VAR:-default}` in policy strings; `$${` writes a literal `${`.
//!
//! Interpolation runs on parsed string values, never on the raw file, so a secret holding YAML
//! syntax (quotes, colons, newlines) cannot change the document's structure.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterpolationError {
    #[error("environment variable `{0}` is not set (write `${{{0}:-default}}` for a default)")]
    Missing(String),
    #[error("`${{` without a closing `}}`")]
    Unclosed,
    #[error("`{0}` is not a valid environment variable name")]
    BadName(String),
}

/// Replaces every reference, reporting every problem in the string, not just the first.
pub fn interpolate(
    template: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, Vec<InterpolationError>> {
    let mut out = String::with_capacity(template.len());
    let mut errors = Vec::new();
    let mut rest = template;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            let Some(close) = tail.find('}') else {
                errors.push(InterpolationError::Unclosed);
                rest = "";
                break;
            };
            let reference = &tail[..close];
            let (name, default) = match reference.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (reference, None),
            };
            let valid_name = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid_name {
                errors.push(InterpolationError::BadName(name.to_owned()));
            } else {
                match (lookup(name), default) {
                    (Some(value), _) => out.push_str(&value),
                    (None, Some(default)) => out.push_str(default),
                    (None, None) => errors.push(InterpolationError::Missing(name.to_owned())),
                }
            }
            rest = &tail[close + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "KEY" => Some("sk-123".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn replaces_references_and_defaults() {
        assert_eq!(interpolate("Bearer ${KEY}", &env).unwrap(), "Bearer sk-123");
        assert_eq!(interpolate("${NOPE:-dflt}/x", &env).unwrap(), "dflt/x");
        assert_eq!(interpolate("${EMPTY:-dflt}", &env).unwrap(), "");
        assert_eq!(
            interpolate("cost $5 and $${KEY}", &env).unwrap(),
            "cost $5 and ${KEY}"
        );
    }

    #[test]
    fn reports_every_problem() {
        let errors = interpolate("${A}-${B}-${1X}", &env).unwrap_err();
        assert_eq!(
            errors,
            vec![
                InterpolationError::Missing("A".into()),
                InterpolationError::Missing("B".into()),
                InterpolationError::BadName("1X".into()),
            ]
        );
        assert!(errors[0].to_string().contains("`A` is not set"));
        assert_eq!(
            interpolate("${KEY", &env).unwrap_err(),
            vec![InterpolationError::Unclosed]
        );
    }

    #[test]
    fn values_are_inserted_verbatim() {
        let lookup = |_: &str| Some("a: [b, \"c\"]\n".to_owned());
        assert_eq!(interpolate("${X}", &lookup).unwrap(), "a: [b, \"c\"]\n");
    }
}
