//! Topic patterns with named placeholders.
//!
//! An ingress pattern is an MQTT filter whose single-level wildcards may be named:
//! `store/+/pos/{device}/transactions` subscribes to `store/+/pos/+/transactions` and, for a message
//! on `store/12/pos/lane-3/transactions`, yields `device = "lane-3"`. `#` is allowed as the last
//! level. Egress templates use `{store}`, `{stream}`, `{key}` and `{source}`.
//!
//! A value substituted into an egress template comes from a record (a key HQ chose, a device
//! name), so it is checked before anything is published: [`render_checked`] refuses a topic
//! the broker or the client cannot take (a wildcard, U+0000 or another character Mosquitto
//! refuses in an MQTT string, an empty topic, more than 65,535 bytes, a leading `$`). Egress then
//! dead-letters that one record instead of failing the publish, which restarted egress at the
//! same cursor forever. Values are Rust strings, so invalid UTF-8 cannot reach a topic (the
//! downlink decodes Kafka keys lossily).

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

/// Longest MQTT string (topic, user property), in bytes: a two-byte length prefix.
pub const MAX_MQTT_STRING_BYTES: usize = 65_535;

/// Why a value cannot go into an MQTT topic or string. The label is the metric's `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicProblem {
    /// `+` or `#`: a wildcard cannot appear in a topic name.
    Wildcard,
    /// U+0000, which no MQTT string may contain.
    Nul,
    /// A control character (U+0001 to U+001F, U+007F to U+009F) or a Unicode non-character,
    /// which Mosquitto refuses as malformed UTF-8 and disconnects the client for.
    Character,
    Empty,
    TooLong,
    /// A leading `$` makes it a broker topic (`$SYS`, ...), not one we may publish to.
    Reserved,
}

impl TopicProblem {
    pub fn label(self) -> &'static str {
        match self {
            TopicProblem::Wildcard => "topic_wildcard",
            TopicProblem::Nul => "topic_nul",
            TopicProblem::Character => "topic_character",
            TopicProblem::Empty => "topic_empty",
            TopicProblem::TooLong => "topic_too_long",
            TopicProblem::Reserved => "topic_reserved",
        }
    }
}

/// A topic that could not be formed: which problem, and a sentence naming the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicRefusal {
    pub problem: TopicProblem,
    pub reason: String,
}

/// Whether `s` may be sent as an MQTT UTF-8 string (MQTT 5 section 1.5.4, as Mosquitto enforces
/// it). Checks the characters only, not the length.
pub fn check_mqtt_chars(s: &str) -> Result<(), TopicProblem> {
    for c in s.chars() {
        let u = c as u32;
        if u == 0 {
            return Err(TopicProblem::Nul);
        }
        let control = u <= 0x1f || (0x7f..=0x9f).contains(&u);
        let nonchar = (0xfdd0..=0xfdef).contains(&u) || (u & 0xfffe) == 0xfffe;
        if control || nonchar {
            return Err(TopicProblem::Character);
        }
    }
    Ok(())
}

/// Renders an egress topic template, refusing a topic that cannot be published.
pub fn render_checked(template: &str, vars: &[(&str, &str)]) -> Result<String, TopicRefusal> {
    for (name, value) in vars {
        if !template.contains(&format!("{{{name}}}")) {
            continue;
        }
        let shown: String = value.chars().take(80).collect();
        let problem = if value.contains(['+', '#']) {
            Some(TopicProblem::Wildcard)
        } else {
            check_mqtt_chars(value).err()
        };
        if let Some(problem) = problem {
            let what = match problem {
                TopicProblem::Wildcard => "contains the MQTT wildcard '+' or '#'",
                TopicProblem::Nul => "contains U+0000",
                _ => "contains a control character or a Unicode non-character",
            };
            return Err(TopicRefusal {
                problem,
                reason: format!(
                    "the value {shown:?} of {{{name}}} {what}, so topic template {template:?} gives no valid MQTT topic"
                ),
            });
        }
    }
    let topic = render(template, vars);
    let refuse = |problem, what: String| TopicRefusal {
        problem,
        reason: format!("topic template {template:?} gives {what}"),
    };
    if topic.is_empty() {
        return Err(refuse(TopicProblem::Empty, "an empty topic".into()));
    }
    if topic.len() > MAX_MQTT_STRING_BYTES {
        return Err(refuse(
            TopicProblem::TooLong,
            format!(
                "a topic of {} bytes (MQTT allows {MAX_MQTT_STRING_BYTES})",
                topic.len()
            ),
        ));
    }
    if topic.starts_with('$') {
        let shown: String = topic.chars().take(80).collect();
        return Err(refuse(
            TopicProblem::Reserved,
            format!("{shown:?}, a broker topic (leading '$')"),
        ));
    }
    Ok(topic)
}

/// Renders an egress topic template in one pass over the template: each `{name}` with a value
/// in `vars` is replaced by it, anything else is copied. A value is never scanned for
/// placeholders, so a key `{source}` stays the text `{source}` (replacing one placeholder after
/// another put the source there, unchecked; found by the `mqtt_topic` fuzz target).
pub fn render(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let value = after.find('}').and_then(|end| {
            let name = &after[..end];
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v, end))
        });
        match value {
            Some((v, end)) => {
                out.push_str(v);
                rest = &after[end + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The placeholders of an egress topic template.
pub const EGRESS_PLACEHOLDERS: &[&str] = &["store", "stream", "key", "source"];

/// Why an egress topic template cannot give publishable topics (empty when it can, for some
/// values): config validation reports each of these, and [`render_checked`] relies on it, as it
/// checks only the substituted values and the rendered topic's length and first character.
pub fn egress_template_problems(template: &str) -> Vec<String> {
    let mut out = Vec::new();
    if template.is_empty() || template.contains(['+', '#']) {
        out.push("must be a topic name without wildcards".to_string());
    }
    match check_mqtt_chars(template) {
        Err(TopicProblem::Nul) => out.push("contains U+0000".to_string()),
        Err(_) => out.push("contains a control character or a Unicode non-character".to_string()),
        Ok(()) => {}
    }
    if template.starts_with('$') {
        out.push("must not start with '$' (broker topics)".to_string());
    }
    if template.len() > MAX_MQTT_STRING_BYTES {
        out.push(format!(
            "is {} bytes long (MQTT allows {MAX_MQTT_STRING_BYTES})",
            template.len()
        ));
    }
    for u in unknown_placeholders(template, EGRESS_PLACEHOLDERS) {
        out.push(format!(
            "unknown placeholder {u}; use {{store}}, {{stream}}, {{key}} or {{source}}"
        ));
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
    fn substituted_values_that_break_the_topic_are_refused_with_a_reason() {
        let t = "store/{store}/prices/{key}";
        let ok = |key: &str| render_checked(t, &[("store", "s1"), ("key", key)]);
        assert_eq!(ok("4011").unwrap(), "store/s1/prices/4011");
        // A key with levels is a valid topic (keys like `store/device` are common).
        assert_eq!(ok("s1/4011").unwrap(), "store/s1/prices/s1/4011");
        assert_eq!(ok("").unwrap(), "store/s1/prices/");
        let e = ok("s1/promo+42").unwrap_err();
        assert_eq!(e.problem, TopicProblem::Wildcard);
        assert!(
            e.reason.contains("s1/promo+42") && e.reason.contains("{key}"),
            "{}",
            e.reason
        );
        assert_eq!(ok("a#").unwrap_err().problem, TopicProblem::Wildcard);
        assert_eq!(ok("a\0b").unwrap_err().problem, TopicProblem::Nul);
        assert_eq!(ok("a\nb").unwrap_err().problem, TopicProblem::Character);
        assert_eq!(ok("a\u{85}b").unwrap_err().problem, TopicProblem::Character);
        assert_eq!(
            ok("a\u{fffe}").unwrap_err().problem,
            TopicProblem::Character
        );
        assert_eq!(
            ok("a\u{1fffe}").unwrap_err().problem,
            TopicProblem::Character
        );
        assert_eq!(ok("prix-é-✓").unwrap(), "store/s1/prices/prix-é-✓");
        assert_eq!(
            ok(&"k".repeat(MAX_MQTT_STRING_BYTES)).unwrap_err().problem,
            TopicProblem::TooLong
        );
        let whole = |key: &str| render_checked("{key}", &[("key", key)]);
        assert_eq!(whole("").unwrap_err().problem, TopicProblem::Empty);
        assert_eq!(whole("$SYS/x").unwrap_err().problem, TopicProblem::Reserved);
        // A value is not read as a placeholder: the unchecked source does not get in this way.
        assert_eq!(
            render_checked(
                t,
                &[("store", "s1"), ("key", "{source}"), ("source", "a+b")]
            )
            .unwrap(),
            "store/s1/prices/{source}"
        );
        assert_eq!(render("{{key}}/{x", &[("key", "k")]), "{k}/{x");
        // A placeholder the template does not use is not checked.
        assert!(render_checked("a/{key}", &[("key", "k"), ("source", "bad+")]).is_ok());
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
