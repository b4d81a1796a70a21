//! Finds the values a mapping's JSON Pointers (RFC 6901) name in a record, in one pass over
//! its text and without building the document: each value comes back as its own JSON text,
//! borrowed from the record. Fields no pointer names are checked to be JSON and skipped,
//! which saves the allocations a `serde_json::Value` makes for every key and value.
//!
//! The answers are those of `serde_json::Value::pointer` on the parsed document (a property
//! test holds them to it), including for a key repeated in an object, where the last wins.

use std::borrow::Cow;
use std::fmt;

use serde::de::{
    self, Deserialize, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor,
};
use serde_json::value::RawValue;

/// The pointers a mapping reads from one document, merged into a tree of their tokens.
#[derive(Debug, Clone, Default)]
pub struct Pointers {
    root: Node,
    count: usize,
}

#[derive(Debug, Clone, Default)]
struct Node {
    /// The pointers, by index, whose last token leads here.
    ends: Vec<usize>,
    /// The tokens that lead further, each once, with the array index a token also names.
    children: Vec<(String, Option<usize>, Node)>,
}

impl Pointers {
    /// The pointers, in order: `find` reports pointer `i`'s value at index `i`. Each must
    /// be a valid JSON Pointer (`""` or starting with `/`).
    pub fn new<'a>(pointers: impl IntoIterator<Item = &'a str>) -> Pointers {
        let mut set = Pointers::default();
        for (index, pointer) in pointers.into_iter().enumerate() {
            let mut node = &mut set.root;
            for token in pointer.split('/').skip(1) {
                let token = token.replace("~1", "/").replace("~0", "~");
                let at = match node.children.iter().position(|(t, _, _)| *t == token) {
                    Some(at) => at,
                    None => {
                        let array_index = array_index(&token);
                        node.children.push((token, array_index, Node::default()));
                        node.children.len() - 1
                    }
                };
                node = &mut node.children[at].2;
            }
            node.ends.push(index);
            set.count = index + 1;
        }
        set
    }

    /// How many pointers there are.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Checks that `text` is one JSON document and sets `found[i]` to the JSON text of
    /// pointer `i`'s value, or `None` where the document has none. `found` has
    /// [`len`](Pointers::len) entries.
    pub fn find<'t>(&self, text: &'t str, found: &mut [Option<&'t str>]) -> serde_json::Result<()> {
        found.fill(None);
        self.root.search(text, found)
    }
}

impl Node {
    /// Finds this node's pointers in `text`, a JSON value that is not yet known to be valid.
    fn search<'t>(&self, text: &'t str, found: &mut [Option<&'t str>]) -> serde_json::Result<()> {
        let mut de = serde_json::Deserializer::from_str(text);
        let within = Within {
            node: self,
            found: &mut *found,
        };
        match text.trim_start().as_bytes().first() {
            Some(b'{') if !self.children.is_empty() => de.deserialize_map(within)?,
            Some(b'[') if !self.children.is_empty() => de.deserialize_seq(within)?,
            _ => {
                IgnoredAny::deserialize(&mut de)?;
            }
        }
        de.end()?;
        self.found_at(text.trim(), found);
        Ok(())
    }

    /// The same, for `raw`, a value serde_json has checked: a node without children takes it
    /// as it is.
    fn search_checked<'t>(
        &self,
        raw: &'t RawValue,
        found: &mut [Option<&'t str>],
    ) -> serde_json::Result<()> {
        self.forget(found);
        if self.children.is_empty() {
            self.found_at(raw.get(), found);
            Ok(())
        } else {
            self.search(raw.get(), found)
        }
    }

    fn found_at<'t>(&self, text: &'t str, found: &mut [Option<&'t str>]) {
        for index in &self.ends {
            found[*index] = Some(text);
        }
    }

    /// Forgets what an earlier occurrence of a repeated key set below this node: the last
    /// occurrence is the value, as in `serde_json::Value`.
    fn forget(&self, found: &mut [Option<&str>]) {
        for index in &self.ends {
            found[*index] = None;
        }
        for (_, _, child) in &self.children {
            child.forget(found);
        }
    }
}

/// The RFC 6901 array index a token names: decimal digits without a leading zero or sign.
pub fn array_index(token: &str) -> Option<usize> {
    if token.starts_with('+') || (token.len() > 1 && token.starts_with('0')) {
        return None;
    }
    token.parse().ok()
}

/// Visits an object or an array, descending into the keys or indices a pointer names and
/// skipping the others.
struct Within<'n, 'f, 't> {
    node: &'n Node,
    found: &'f mut [Option<&'t str>],
}

impl<'t> Visitor<'t> for Within<'_, '_, 't> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object or array")
    }

    fn visit_map<A: MapAccess<'t>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(Key(key)) = map.next_key()? {
            match self.node.children.iter().find(|(t, _, _)| *t == *key) {
                // Only pointers below it: read on into it, in the same pass.
                Some((_, _, child)) if child.ends.is_empty() => {
                    child.forget(self.found);
                    map.next_value_seed(Within {
                        node: child,
                        found: &mut *self.found,
                    })?;
                }
                Some((_, _, child)) => {
                    let raw: &'t RawValue = map.next_value()?;
                    child
                        .search_checked(raw, self.found)
                        .map_err(de::Error::custom)?;
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }

    // A value that is neither an object nor an array has nothing below it to find.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'t>>(self, mut seq: A) -> Result<(), A::Error> {
        for index in 0.. {
            let child = self
                .node
                .children
                .iter()
                .find(|(_, i, _)| *i == Some(index));
            let more = match child {
                Some((_, _, child)) if child.ends.is_empty() => {
                    child.forget(self.found);
                    let within = Within {
                        node: child,
                        found: &mut *self.found,
                    };
                    seq.next_element_seed(within)?.is_some()
                }
                Some((_, _, child)) => match seq.next_element::<&'t RawValue>()? {
                    Some(raw) => {
                        child
                            .search_checked(raw, self.found)
                            .map_err(de::Error::custom)?;
                        true
                    }
                    None => false,
                },
                None => seq.next_element::<IgnoredAny>()?.is_some(),
            };
            if !more {
                break;
            }
        }
        Ok(())
    }
}

/// Reads a value whatever it is, finding the node's pointers below it (used for a node that
/// only leads further: no pointer ends there, so its text is not needed).
impl<'t> DeserializeSeed<'t> for Within<'_, '_, 't> {
    type Value = ();

    fn deserialize<D: Deserializer<'t>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

/// An object key, borrowed from the document unless it holds an escape.
struct Key<'t>(Cow<'t, str>);

impl<'t> Deserialize<'t> for Key<'t> {
    fn deserialize<D: Deserializer<'t>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'t> Visitor<'t> for KeyVisitor {
            type Value = Key<'t>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E: de::Error>(self, key: &'t str) -> Result<Key<'t>, E> {
                Ok(Key(Cow::Borrowed(key)))
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<Key<'t>, E> {
                Ok(Key(Cow::Owned(key.to_string())))
            }
            fn visit_string<E: de::Error>(self, key: String) -> Result<Key<'t>, E> {
                Ok(Key(Cow::Owned(key)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn agrees(doc: &str, pointers: &[&str]) {
        let value: Value = serde_json::from_str(doc).expect("json");
        let set = Pointers::new(pointers.iter().copied());
        let mut found = vec![None; set.len()];
        set.find(doc, &mut found).expect("finds");
        for (pointer, got) in pointers.iter().zip(&found) {
            let got: Option<Value> = got.map(|t| serde_json::from_str(t).expect("a value"));
            assert_eq!(got.as_ref(), value.pointer(pointer), "{pointer} in {doc}");
        }
    }

    #[test]
    fn finds_what_value_pointer_finds() {
        let doc = r#" {"a": {"b/c": [10, {"d~e": true}]}, "": 1, "arr": [0, 1], "n": null,
                      "s": "x\"y", "esc\u0061ped": 2} "#;
        agrees(
            doc,
            &[
                "",
                "/a",
                "/a/b~1c",
                "/a/b~1c/0",
                "/a/b~1c/1/d~0e",
                "/",
                "/arr/1",
                "/arr/01",
                "/arr/+1",
                "/arr/9",
                "/x/y",
                "/n",
                "/s",
                "/escaped",
                "/s/0",
                "/arr/1/x",
            ],
        );
    }

    #[test]
    fn a_pointer_below_a_value_that_is_not_an_object_or_array_finds_nothing() {
        agrees(
            r#"{"n": 5, "big": 123456789012345678901234567890, "f": -1.5e3, "b": true,
                "z": null, "s": "text", "o": {"k": [1, {"deep": 2}]}, "after": 1}"#,
            &[
                "/n/x",
                "/big/0",
                "/f/x",
                "/b/x",
                "/z/x",
                "/s/x",
                "/o/k/1/deep",
                "/o/k/0/x",
                "/after",
            ],
        );
    }

    #[test]
    fn a_repeated_key_takes_its_last_value_below_it_too() {
        agrees(
            r#"{"a": {"b": 1, "c": 2}, "a": {"c": 3}, "d": 1, "d": [5]}"#,
            &["/a/b", "/a/c", "/a", "/d", "/d/0"],
        );
        // No pointer names `a` itself: it is read into in the same pass, and still forgotten.
        agrees(
            r#"{"a": {"b": 1, "c": 2}, "a": {"c": 3}, "d": [[7]], "d": [5]}"#,
            &["/a/b", "/a/c", "/d/0/0"],
        );
    }

    #[test]
    fn refuses_what_is_not_one_json_document() {
        let mut found = vec![None];
        for bad in [
            r#"{"a": 1"#,
            r#"{"a": 1} x"#,
            r#"{"b": [1,]}"#,
            "",
            r#"{"a": tru}"#,
            r#"{"a": {"b": 1,}}"#,
            r#"{"a": {"b": [1 2]}}"#,
            r#"{"a": {"c": nul}}"#,
        ] {
            // Read from the value itself, and from below it in the same pass.
            for pointer in ["/a", "/a/b"] {
                let set = Pointers::new([pointer]);
                assert!(set.find(bad, &mut found).is_err(), "{pointer} in {bad}");
            }
        }
    }
}
