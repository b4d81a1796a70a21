//! Reading pipeline files: the `config` crate (YAML and `IDEMSINK_*` overrides), then
//! `${VAR}` interpolation, then the typed model, then the checks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::check::check;
use super::{ConfigError, ConfigErrors, LoadedPipeline, PipelineConfig};

/// Top-level keys that `IDEMSINK_<KEY>__…` environment variables may override.
const OVERRIDABLE_SECTIONS: &[&str] = &["PIPELINE", "SOURCE__", "SINK__", "BATCH__", "ERRORS__"];

/// The pipeline files named by `path`: the file itself, or every `*.yaml`/`*.yml` in a directory.
pub fn pipeline_files(path: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let err = |message: String| ConfigError {
        file: path.to_path_buf(),
        key: String::new(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(format!("cannot read: {e}")))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| err(format!("cannot list: {e}")))? {
        let file = entry.map_err(|e| err(format!("cannot list: {e}")))?.path();
        let is_yaml = matches!(
            file.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        );
        if is_yaml && file.is_file() {
            files.push(file);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(err("no *.yaml pipeline files in this directory".into()));
    }
    Ok(files)
}

/// Loads every pipeline under `path`, reporting all problems of all files at once.
pub fn load_all(path: &Path) -> Result<Vec<LoadedPipeline>, ConfigErrors> {
    let files = pipeline_files(path).map_err(|e| ConfigErrors(vec![e]))?;
    let env: Vec<(String, String)> = std::env::vars().collect();
    let mut loaded = Vec::new();
    let mut errors = Vec::new();
    for file in files {
        match load_file(&file, &env) {
            Ok(pipeline) => loaded.push(pipeline),
            Err(mut e) => errors.append(&mut e),
        }
    }
    let mut seen = BTreeMap::new();
    for pipeline in &loaded {
        if let Some(first) = seen.insert(pipeline.name().to_string(), pipeline.file.clone()) {
            errors.push(pipeline.error(
                "pipeline",
                format!(
                    "`{}` is also the name of {}; names must be unique",
                    pipeline.name(),
                    first.display()
                ),
            ));
        }
    }
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Loads one file with the given environment (passed in so tests need not touch the process's).
pub fn load_file(
    file: &Path,
    env: &[(String, String)],
) -> Result<LoadedPipeline, Vec<ConfigError>> {
    let err = |key: &str, message: String| {
        vec![ConfigError {
            file: file.to_path_buf(),
            key: key.into(),
            message,
        }]
    };
    let text = std::fs::read_to_string(file).map_err(|e| err("", format!("cannot read: {e}")))?;
    let overrides: config::Map<String, String> = env
        .iter()
        .filter_map(|(k, v)| {
            let rest = k.strip_prefix("IDEMSINK_")?;
            OVERRIDABLE_SECTIONS
                .iter()
                .any(|s| rest.starts_with(s))
                .then(|| (k.clone(), v.clone()))
        })
        .collect();
    let tree: Value = config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Yaml))
        .add_source(
            config::Environment::with_prefix("IDEMSINK")
                .prefix_separator("_")
                .separator("__")
                // Strings stay strings (`007`, `1e5`); typed keys parse their text (`scalar`).
                .try_parsing(false)
                .list_separator(",")
                .with_list_parse_key("source.topics")
                .source(Some(overrides)),
        )
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| err("", format!("not a valid pipeline file: {e}")))?;
    let tree = interpolate(tree, "", env).map_err(|(key, message)| err(&key, message))?;
    let config: PipelineConfig = serde_path_to_error::deserialize(tree).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." { String::new() } else { key };
        err(&key, e.into_inner().to_string())
    })?;
    check(file, config)
}

/// Replaces `${NAME}` (or `${NAME:-default}`) in every string of the tree.
fn interpolate(
    value: Value,
    key: &str,
    env: &[(String, String)],
) -> Result<Value, (String, String)> {
    let child = |k: &str| {
        if key.is_empty() {
            k.to_string()
        } else {
            format!("{key}.{k}")
        }
    };
    Ok(match value {
        Value::String(s) => {
            Value::String(interpolate_str(&s, env).map_err(|m| (key.to_string(), m))?)
        }
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| interpolate(v, &child(&i.to_string()), env))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| interpolate(v, &child(&k), env).map(|v| (k, v)))
                .collect::<Result<_, _>>()?,
        ),
        other => other,
    })
}

pub(super) fn interpolate_str(s: &str, env: &[(String, String)]) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated `${` in value".to_string())?;
        let (name, default) = match after[..end].split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (&after[..end], None),
        };
        let found = env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        match found.or(default) {
            Some(v) => out.push_str(v),
            None => return Err(format!("environment variable {name} is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}
