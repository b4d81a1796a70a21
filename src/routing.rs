//! Which table each topic's records go to: one table for every topic (`sink.table`), or a
//! table per topic (`sink.tables`, an explicit map, and `sink.table_from_topic`, a pattern
//! over the topic's name), resolved once, when the file is loaded, for every topic the
//! pipeline reads. A batch may then hold rows of several tables; it still commits in one
//! transaction with its offsets.

use std::collections::BTreeMap;

use regex::Regex;
use serde::Deserialize;

use crate::schema::TableName;

/// `sink.table_from_topic`: a topic's table from its name.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableFromTopic {
    /// A regular expression the whole topic name must match (`^…$` is implied).
    pub pattern: String,
    /// The table, with `$1` or `${name}` standing for the pattern's groups.
    pub table: String,
}

/// Where each topic's rows go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routes {
    /// The tables, each once, in the order their first topic is listed.
    pub tables: Vec<Route>,
    /// Per topic, its table's index in `tables`.
    table_of_topic: BTreeMap<String, usize>,
}

/// A table and where the configuration names it, for messages about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub table: TableName,
    /// The key that names it (`sink.table`, `sink.tables.<topic>`, `sink.table_from_topic`).
    pub key: String,
}

/// A problem with the routing: (config key, message).
pub type RouteProblem = (String, String);

/// The routing as configured, checked for its own consistency: one table for every topic,
/// or a table per topic by explicit entries and a pattern.
enum Rule<'a> {
    OneTable(&'a str),
    PerTopic {
        tables: &'a BTreeMap<String, String>,
        pattern: Option<(Regex, &'a str)>,
    },
}

impl<'a> Rule<'a> {
    fn of(
        topics: &[String],
        table: Option<&'a str>,
        tables: &'a BTreeMap<String, String>,
        from_topic: Option<&'a TableFromTopic>,
    ) -> Result<Rule<'a>, Vec<RouteProblem>> {
        let per_topic = !tables.is_empty() || from_topic.is_some();
        let mut problems: Vec<RouteProblem> = Vec::new();
        match (table, per_topic) {
            (Some(_), true) => problems.push(problem(
                "sink.table",
                "give either one table for every topic (sink.table) or a table per topic \
                 (sink.tables, sink.table_from_topic), not both"
                    .into(),
            )),
            (None, false) => problems.push(problem(
                "sink.table",
                "must name the table (or give a table per topic with sink.tables or \
                 sink.table_from_topic)"
                    .into(),
            )),
            _ => {}
        }
        for topic in tables.keys().filter(|t| !topics.contains(t)) {
            problems.push(problem(
                &format!("sink.tables.{topic}"),
                format!("`{topic}` is not one of source.topics"),
            ));
        }
        // The pattern must match the whole topic name.
        let pattern = from_topic.and_then(|f| match Regex::new(&format!("^(?:{})$", f.pattern)) {
            Ok(re) => Some((re, f.table.as_str())),
            Err(e) => {
                problems.push(problem(
                    "sink.table_from_topic.pattern",
                    format!("not a valid regular expression: {e}"),
                ));
                None
            }
        });
        match table {
            _ if !problems.is_empty() => Err(problems),
            Some(one) => Ok(Rule::OneTable(one)),
            None => Ok(Rule::PerTopic { tables, pattern }),
        }
    }

    /// The table `topic` goes to, as text, with the key that names it.
    fn table_of(&self, topic: &str) -> Result<(String, String), RouteProblem> {
        match self {
            Rule::OneTable(one) => Ok(("sink.table".into(), one.to_string())),
            Rule::PerTopic { tables, .. } if tables.contains_key(topic) => {
                Ok((format!("sink.tables.{topic}"), tables[topic].clone()))
            }
            Rule::PerTopic {
                pattern: Some((re, template)),
                ..
            } => {
                let groups = re.captures(topic).ok_or_else(|| {
                    problem(
                        "sink.table_from_topic.pattern",
                        format!(
                            "topic `{topic}` does not match it, and sink.tables does not name \
                             its table"
                        ),
                    )
                })?;
                let mut expanded = String::new();
                groups.expand(template, &mut expanded);
                Ok(("sink.table_from_topic".into(), expanded))
            }
            Rule::PerTopic { pattern: None, .. } => Err(problem(
                "sink.tables",
                format!("topic `{topic}` has no table: add it here, or use sink.table_from_topic"),
            )),
        }
    }
}

fn problem(key: &str, message: String) -> RouteProblem {
    (key.to_string(), message)
}

impl Routes {
    /// Resolves the table of each of `topics`. Exactly one of `table` and (`tables`,
    /// `table_from_topic`) is given; an explicit entry wins over the pattern, and every topic
    /// must end up with a valid table name.
    pub fn resolve(
        topics: &[String],
        table: Option<&str>,
        tables: &BTreeMap<String, String>,
        from_topic: Option<&TableFromTopic>,
    ) -> Result<Routes, Vec<RouteProblem>> {
        let rule = Rule::of(topics, table, tables, from_topic)?;
        let mut routes = Routes {
            tables: Vec::new(),
            table_of_topic: BTreeMap::new(),
        };
        let mut problems = Vec::new();
        for topic in topics {
            let named = rule.table_of(topic).and_then(|(key, text)| {
                let table = TableName::parse(&text).map_err(|e| {
                    problem(&key, format!("the table of topic `{topic}`, `{text}`: {e}"))
                })?;
                Ok(Route { table, key })
            });
            match named {
                Ok(route) => routes.add(topic, route),
                Err(found) => problems.push(found),
            }
        }
        if problems.is_empty() {
            Ok(routes)
        } else {
            Err(problems)
        }
    }

    /// Routes `topic` to `route`'s table, which topics may share.
    fn add(&mut self, topic: &str, route: Route) {
        let index = match self.tables.iter().position(|r| r.table == route.table) {
            Some(index) => index,
            None => {
                self.tables.push(route);
                self.tables.len() - 1
            }
        };
        self.table_of_topic.insert(topic.to_string(), index);
    }

    /// The index of `topic`'s table in [`Routes::tables`]; `None` for a topic the pipeline
    /// does not read.
    pub fn table_of(&self, topic: &str) -> Option<usize> {
        self.table_of_topic.get(topic).copied()
    }

    /// The most topics that share one table.
    pub fn most_topics_per_table(&self) -> usize {
        (0..self.tables.len())
            .map(|t| self.topics_of(t).count())
            .max()
            .unwrap_or(0)
    }

    /// The topics whose rows go to table `index`.
    pub fn topics_of(&self, index: usize) -> impl Iterator<Item = &str> {
        self.table_of_topic
            .iter()
            .filter(move |(_, t)| **t == index)
            .map(|(topic, _)| topic.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    fn map(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn table_names(routes: &Routes, topics: &[String]) -> Vec<String> {
        topics
            .iter()
            .map(|t| routes.tables[routes.table_of(t).unwrap()].table.to_string())
            .collect()
    }

    #[test]
    fn one_table_takes_every_topic() {
        let listed = topics(&["a", "b"]);
        let routes = Routes::resolve(&listed, Some("public.t"), &map(&[]), None).unwrap();
        assert_eq!(table_names(&routes, &listed), ["public.t", "public.t"]);
        assert_eq!(routes.tables[0].key, "sink.table");
        assert_eq!(
            routes.table_of("c"),
            None,
            "a topic the pipeline does not read"
        );
    }

    #[test]
    fn a_pattern_names_each_topics_table_and_an_explicit_entry_wins() {
        let listed = topics(&[
            "shop.public.orders",
            "shop.public.order_lines",
            "shop.inv.Items",
        ]);
        let pattern = TableFromTopic {
            pattern: r"shop\.(\w+)\.(?<table>\w+)".into(),
            table: "replica.${table}".into(),
        };
        let explicit = map(&[("shop.public.order_lines", "lines")]);
        let routes = Routes::resolve(&listed, None, &explicit, Some(&pattern)).unwrap();
        assert_eq!(
            table_names(&routes, &listed),
            ["replica.orders", "lines", "replica.Items"]
        );
        assert_eq!(routes.tables[1].key, "sink.tables.shop.public.order_lines");
        assert_eq!(
            routes.topics_of(0).collect::<Vec<_>>(),
            ["shop.public.orders"]
        );
    }

    #[test]
    fn topics_of_one_table_share_it() {
        let listed = topics(&["eu.orders", "us.orders"]);
        let pattern = TableFromTopic {
            pattern: r"\w+\.(\w+)".into(),
            table: "$1".into(),
        };
        let routes = Routes::resolve(&listed, None, &map(&[]), Some(&pattern)).unwrap();
        assert_eq!(routes.tables.len(), 1);
        assert_eq!(routes.table_of("us.orders"), Some(0));
        assert_eq!(routes.most_topics_per_table(), 2);
    }

    #[test]
    fn every_topic_needs_exactly_one_valid_table() {
        let listed = topics(&["shop.public.orders", "other"]);
        let keys = |problems: Vec<RouteProblem>| -> Vec<String> {
            problems.into_iter().map(|(key, _)| key).collect()
        };
        let pattern = |pattern: &str, table: &str| TableFromTopic {
            pattern: pattern.into(),
            table: table.into(),
        };
        // Neither, and both.
        let none = Routes::resolve(&listed, None, &map(&[]), None).unwrap_err();
        assert_eq!(keys(none), ["sink.table"]);
        let both = Routes::resolve(&listed, Some("t"), &map(&[("other", "o")]), None).unwrap_err();
        assert_eq!(keys(both), ["sink.table"]);
        // A topic the pattern does not match (the whole name must match) and none names.
        let partial = pattern(r"shop\.public\.(\w+)", "$1");
        let unmatched = Routes::resolve(&listed, None, &map(&[]), Some(&partial)).unwrap_err();
        assert_eq!(keys(unmatched), ["sink.table_from_topic.pattern"]);
        assert!(Routes::resolve(
            &topics(&["xshop.public.a"]),
            None,
            &map(&[]),
            Some(&partial)
        )
        .is_err());
        // A map that misses a topic, or names one not read.
        let missing = Routes::resolve(&listed, None, &map(&[("other", "o")]), None).unwrap_err();
        assert_eq!(keys(missing), ["sink.tables"]);
        let stranger = map(&[("other", "o"), ("shop.public.orders", "p"), ("gone", "g")]);
        let unread = Routes::resolve(&listed, None, &stranger, None).unwrap_err();
        assert_eq!(keys(unread), ["sink.tables.gone"]);
        // A bad pattern, and a table name the template makes invalid.
        let broken =
            Routes::resolve(&listed, None, &map(&[]), Some(&pattern("(", "t"))).unwrap_err();
        assert_eq!(keys(broken), ["sink.table_from_topic.pattern"]);
        let invalid =
            Routes::resolve(&listed, None, &map(&[]), Some(&pattern(".*", "a.b.c"))).unwrap_err();
        assert_eq!(
            keys(invalid),
            ["sink.table_from_topic", "sink.table_from_topic"]
        );
    }
}
