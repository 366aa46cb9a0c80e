//! Topic patterns with named placeholders.
//!
//! An ingress pattern is an MQTT filter whose single-level wildcards may be named:
//! `store/+/pos/{device}/transactions` subscribes to `store/+/pos/+/transactions` and, for a message
//! on `store/12/pos/lane-3/transactions`, yields `device = "lane-3"`. `#` is allowed as the last
//! level. Egress templates use `{store}`, `{stream}`, `{key}` and `{source}`.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Exact(String),
    Any,
    Named(String),
    Rest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    levels: Vec<Level>,
    source: String,
}

impl TopicPattern {
    pub fn parse(pattern: &str) -> Result<TopicPattern, String> {
        if pattern.is_empty() {
            return Err("the topic filter is empty".into());
        }
        let parts: Vec<&str> = pattern.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        for (i, p) in parts.iter().enumerate() {
            let level = match *p {
                "+" => Level::Any,
                "#" if i + 1 == parts.len() => Level::Rest,
                "#" => {
                    return Err(format!(
                        "{pattern:?}: '#' is only allowed as the last level"
                    ));
                }
                p if p.starts_with('{') && p.ends_with('}') && p.len() > 2 => {
                    let name = &p[1..p.len() - 1];
                    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                        return Err(format!(
                            "{pattern:?}: placeholder {p} may only use letters, digits and '_'"
                        ));
                    }
                    Level::Named(name.to_string())
                }
                p if p.contains(['+', '#', '{', '}']) => {
                    return Err(format!(
                        "{pattern:?}: level {p:?} mixes wildcard or placeholder characters with text"
                    ));
                }
                p => Level::Exact(p.to_string()),
            };
            levels.push(level);
        }
        let mut seen = std::collections::HashSet::new();
        for l in &levels {
            if let Level::Named(n) = l
                && !seen.insert(n.clone())
            {
                return Err(format!("{pattern:?}: placeholder {{{n}}} appears twice"));
            }
        }
        Ok(TopicPattern {
            levels,
            source: pattern.to_string(),
        })
    }

    /// The MQTT subscription filter.
    pub fn filter(&self) -> String {
        self.levels
            .iter()
            .map(|l| match l {
                Level::Exact(s) => s.as_str(),
                Level::Any | Level::Named(_) => "+",
                Level::Rest => "#",
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    pub fn placeholders(&self) -> Vec<&str> {
        self.levels
            .iter()
            .filter_map(|l| match l {
                Level::Named(n) => Some(n.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Matches a topic; returns the named values when it matches.
    pub fn matches(&self, topic: &str) -> Option<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        let mut parts = topic.split('/');
        for level in &self.levels {
            match level {
                Level::Rest => return Some(out),
                _ => {
                    let part = parts.next()?;
                    match level {
                        Level::Exact(s) if s != part => return None,
                        Level::Named(n) => {
                            out.insert(n.clone(), part.to_string());
                        }
                        _ => {}
                    }
                }
            }
        }
        parts.next().is_none().then_some(out)
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

/// Renders an egress topic template.
pub fn render(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = template.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("{{{k}}}"), v);
    }
    out
}

/// Placeholders used in a template that are not among `allowed`.
pub fn unknown_placeholders(template: &str, allowed: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let Some(end) = rest[start..].find('}') else {
            out.push(rest[start..].to_string());
            break;
        };
        let name = &rest[start + 1..start + end];
        if !allowed.contains(&name) {
            out.push(format!("{{{name}}}"));
        }
        rest = &rest[start + end + 1..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_placeholders_become_wildcards_and_are_extracted() {
        let p = TopicPattern::parse("store/+/pos/{device}/transactions").unwrap();
        assert_eq!(p.filter(), "store/+/pos/+/transactions");
        let m = p.matches("store/12/pos/lane-3/transactions").unwrap();
        assert_eq!(m["device"], "lane-3");
        assert!(p.matches("store/12/pos/lane-3/scans").is_none());
        assert!(
            p.matches("store/12/pos/lane-3/transactions/extra")
                .is_none()
        );
        assert!(p.matches("store/12/pos").is_none());
    }

    #[test]
    fn multi_level_wildcard() {
        let p = TopicPattern::parse("kiosk/{kiosk}/#").unwrap();
        assert_eq!(p.filter(), "kiosk/+/#");
        assert_eq!(p.matches("kiosk/k1/a/b/c").unwrap()["kiosk"], "k1");
        assert!(p.matches("other/k1/a").is_none());
    }

    #[test]
    fn bad_patterns_are_explained() {
        assert!(
            TopicPattern::parse("a/#/b")
                .unwrap_err()
                .contains("last level")
        );
        assert!(
            TopicPattern::parse("a/{x}/{x}")
                .unwrap_err()
                .contains("twice")
        );
        assert!(TopicPattern::parse("a/b+c").unwrap_err().contains("mixes"));
        assert!(TopicPattern::parse("").is_err());
    }

    #[test]
    fn templates() {
        assert_eq!(
            render(
                "store/{store}/offers/{key}",
                &[("store", "s1"), ("key", "lane-2")]
            ),
            "store/s1/offers/lane-2"
        );
        assert_eq!(
            unknown_placeholders("a/{store}/{nope}", &["store"]),
            vec!["{nope}"]
        );
    }
}
