//! The pipeline file a test writes for idemsink.

use std::path::PathBuf;

use super::{Case, GROUP_PROPERTIES};

/// The `sink` lines mapping the standard table.
pub const STANDARD_COLUMNS: &str = "  columns:
    id: /id
    body: /body
    payload: $value
    kafka_topic: $topic
    kafka_partition: $partition
    kafka_offset: $offset
";

/// Kafka's consumer group protocols: `classic` (librdkafka assigns, eager or
/// cooperative-sticky) and `consumer` (KIP-848: the broker assigns, always incremental).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupProtocol {
    Classic,
    Consumer,
}

/// A pipeline file of a [`Case`]: its name, database URL, consumer properties, sink lines
/// and extra sections can differ between the instances of one test.
pub struct PipelineFile<'a> {
    case: &'a Case,
    stem: String,
    url: String,
    group: &'static str,
    properties: String,
    source: String,
    sink: String,
    extra: String,
    /// Topic → table (`sink.tables`), instead of the case's topic and table.
    routes: Vec<(String, String)>,
}

impl<'a> PipelineFile<'a> {
    /// The case's standard pipeline: its topic into its table, the standard columns.
    pub fn of(case: &'a Case) -> PipelineFile<'a> {
        PipelineFile {
            case,
            stem: case.name.clone(),
            url: case.url.clone(),
            group: GROUP_PROPERTIES,
            properties: String::new(),
            source: String::new(),
            sink: STANDARD_COLUMNS.to_string(),
            extra: String::new(),
            routes: Vec::new(),
        }
    }

    /// The consumer group protocol: under `consumer` (KIP-848) the broker sets the session
    /// (2 s on the development broker), so [`GROUP_PROPERTIES`] are left out.
    pub fn protocol(mut self, protocol: GroupProtocol) -> Self {
        self.group = match protocol {
            GroupProtocol::Classic => GROUP_PROPERTIES,
            GroupProtocol::Consumer => "group.protocol: consumer",
        };
        self
    }

    /// Lines of the `source` section after `properties` (e.g. `  start_from: latest\n`).
    pub fn source(mut self, lines: &str) -> Self {
        self.source = lines.to_string();
        self
    }

    /// The file name (without `.yaml`), for instances that need files of their own.
    pub fn named(mut self, stem: &str) -> Self {
        self.stem = stem.to_string();
        self
    }

    pub fn url(mut self, url: &str) -> Self {
        self.url = url.to_string();
        self
    }

    /// A librdkafka property, in addition to [`GROUP_PROPERTIES`].
    pub fn property(mut self, key: &str, value: &str) -> Self {
        self.properties.push_str(&format!("\n    {key}: {value}"));
        self
    }

    pub fn sink(mut self, sink: &str) -> Self {
        self.sink = sink.to_string();
        self
    }

    pub fn extra(mut self, extra: &str) -> Self {
        self.extra = extra.to_string();
        self
    }

    /// Reads these topics, each into its table (`sink.tables`), instead of the case's.
    pub fn tables(mut self, routes: &[(&str, &str)]) -> Self {
        self.routes = routes
            .iter()
            .map(|(topic, table)| (topic.to_string(), table.to_string()))
            .collect();
        self
    }

    pub fn write(self) -> PathBuf {
        let (topics, table) = if self.routes.is_empty() {
            (
                self.case.topic.clone(),
                format!("table: {}", self.case.table),
            )
        } else {
            let topics: Vec<&str> = self.routes.iter().map(|(t, _)| t.as_str()).collect();
            let tables: String = (self.routes.iter())
                .map(|(topic, table)| format!("\n    {topic}: {table}"))
                .collect();
            (topics.join(", "), format!("tables:{tables}"))
        };
        let text = format!(
            "pipeline: {name}
source:
  brokers: {brokers}
  topics: [{topics}]
  properties:
    {group}{properties}
{source}sink:
  url: {url}
  {table}
{sink}{extra}",
            name = self.case.name,
            brokers = self.case.brokers,
            properties = self.properties,
            source = self.source,
            group = self.group,
            url = self.url,
            sink = self.sink,
            extra = self.extra,
        );
        let file = self.case.dir.path().join(format!("{}.yaml", self.stem));
        std::fs::write(&file, text).expect("write pipeline file");
        file
    }
}
