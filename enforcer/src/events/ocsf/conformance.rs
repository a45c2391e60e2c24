//! A conformance checker for OCSF events, over OCSF's own schema definition files (the
//! `ocsf-schema` repository's `dictionary.json`, `events/`, `objects/`, `profiles/`; this
//! repository ships the ones its events need in `enforcer/data/ocsf/1.8.0`).
//!
//! It resolves the definitions the way the OCSF schema server compiles them: a class or object
//! is its `extends` chain, each level's `$include`d files (a profile's attributes belong to that
//! profile), and its own attributes, each merged over the dictionary's definition of the
//! attribute (enums are united, a class's `"profile": null` takes an attribute out of its
//! profile). An event is then checked recursively:
//!
//! - its `class_uid` names a class of the files, `category_uid` is that class's category,
//!   `type_uid` is `class_uid * 100 + activity_id`, `metadata.version` is the schema's version;
//! - every attribute is defined for the class or object it appears in, not deprecated, and
//!   not null; an attribute of a profile needs that profile in `metadata.profiles`, and every
//!   profile named there exists;
//! - every `required` attribute is present (a profile's only when the profile is declared),
//!   and the `at_least_one` / `just_one` constraints hold;
//! - values have their attribute's type (scalar types down to their base type, with the
//!   type's regex, maximum length, range and values), arrays where `is_array`, and enum
//!   values are among the enum's keys; a caption sibling (`activity_name` of `activity_id`)
//!   matches the enum's caption, except for `99` (Other);
//! - objects are checked the same way, to any depth; `unmapped` (type `object`) may hold
//!   anything.
//!
//! Used by the tests; kept in the library so that the kernel tests can check what the real
//! agent wrote.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

/// One way an event breaks the schema: where (`dst_endpoint.port`, `attacks[0].tactic`) and
/// what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = if self.path.is_empty() {
            "<event>"
        } else {
            &self.path
        };
        write!(f, "{path}: {}", self.message)
    }
}

/// An attribute of a resolved class or object.
#[derive(Debug, Clone)]
struct Attribute {
    /// The dictionary's definition with every level's definition merged over it.
    def: Map<String, Value>,
    /// The profile that adds this attribute (it needs declaring in `metadata.profiles`).
    profile: Option<String>,
}

impl Attribute {
    fn requirement(&self) -> &str {
        self.def
            .get("requirement")
            .and_then(Value::as_str)
            .unwrap_or("optional")
    }

    fn type_name(&self) -> &str {
        self.def
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("string_t")
    }

    fn is_array(&self) -> bool {
        self.def.get("is_array").and_then(Value::as_bool) == Some(true)
    }

    fn enumeration(&self) -> Option<&Map<String, Value>> {
        self.def
            .get("enum")
            .and_then(Value::as_object)
            .filter(|e| !e.is_empty())
    }

    fn caption_of(&self, key: &str) -> Option<&str> {
        self.enumeration()?
            .get(key)?
            .get("caption")
            .and_then(Value::as_str)
    }
}

/// A class or object with its whole `extends` chain and includes resolved.
#[derive(Debug, Clone, Default)]
struct Definition {
    attributes: BTreeMap<String, Attribute>,
    /// Merged definitions before the dictionary is laid under them.
    overlays: BTreeMap<String, (Map<String, Value>, Option<String>)>,
    at_least_one: Vec<String>,
    just_one: Vec<String>,
    /// Category name (classes).
    category: Option<String>,
}

/// A class of the schema.
#[derive(Debug, Clone)]
struct Class {
    name: String,
    caption: String,
    uid: u64,
    category_uid: u64,
    category_caption: String,
    def: Definition,
}

/// Attributes whose enums the schema server generates per class (the files hold only the
/// base event's): checked against the class itself instead.
const GENERATED: [&str; 3] = ["class_uid", "category_uid", "type_uid"];

/// The schema, loaded from a directory of OCSF definition files.
pub struct Schema {
    root: PathBuf,
    version: String,
    dictionary: Map<String, Value>,
    types: Map<String, Value>,
    classes: BTreeMap<u64, Class>,
    objects: BTreeMap<String, Definition>,
    profiles: BTreeSet<String>,
    regexes: std::sync::Mutex<BTreeMap<String, regex::Regex>>,
}

fn read_json(path: &Path) -> Result<Map<String, Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    match serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))? {
        Value::Object(map) => Ok(map),
        _ => bail!("{}: not a JSON object", path.display()),
    }
}

fn json_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            json_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "json") {
            out.push(path);
        }
    }
    out.sort();
    Ok(())
}

/// `over` merged into `base`: objects key by key (so enums are united), anything else
/// replaced.
fn merge(base: &mut Map<String, Value>, over: &Map<String, Value>) {
    for (key, value) in over {
        match (base.get_mut(key), value) {
            (Some(Value::Object(b)), Value::Object(o)) => merge(b, o),
            _ => {
                base.insert(key.clone(), value.clone());
            }
        }
    }
}

fn string_list(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

impl Schema {
    /// Loads and resolves every class, object and profile under `root` (a copy of the
    /// `ocsf-schema` repository's layout at one release).
    pub fn load(root: &Path) -> Result<Schema> {
        let version = read_json(&root.join("version.json"))?
            .get("version")
            .and_then(Value::as_str)
            .context("version.json has no version")?
            .to_string();
        let mut dictionary = read_json(&root.join("dictionary.json"))?;
        let types = dictionary
            .get("types")
            .and_then(|t| t.get("attributes"))
            .and_then(Value::as_object)
            .cloned()
            .context("dictionary.json has no types")?;
        let dictionary = match dictionary.remove("attributes") {
            Some(Value::Object(attributes)) => attributes,
            _ => bail!("dictionary.json has no attributes"),
        };
        let categories: BTreeMap<String, (u64, String)> = read_json(&root.join("categories.json"))?
            .get("attributes")
            .and_then(Value::as_object)
            .context("categories.json has no attributes")?
            .iter()
            .filter_map(|(name, c)| {
                let caption = c.get("caption")?.as_str()?.to_string();
                Some((name.clone(), (c.get("uid")?.as_u64()?, caption)))
            })
            .collect();

        let mut profiles = BTreeSet::new();
        let mut files = Vec::new();
        json_files(&root.join("profiles"), &mut files)?;
        for file in &files {
            let profile = read_json(file)?;
            if let Some(name) = profile.get("name").and_then(Value::as_str) {
                profiles.insert(name.to_string());
            }
        }

        let mut schema = Schema {
            root: root.to_path_buf(),
            version,
            dictionary,
            types,
            classes: BTreeMap::new(),
            objects: BTreeMap::new(),
            profiles,
            regexes: Default::default(),
        };

        let mut raw_objects = BTreeMap::new();
        let mut files = Vec::new();
        json_files(&root.join("objects"), &mut files)?;
        for file in files {
            let raw = read_json(&file)?;
            let name = raw
                .get("name")
                .and_then(Value::as_str)
                .with_context(|| format!("{}: no name", file.display()))?
                .to_string();
            raw_objects.insert(name, raw);
        }
        for name in raw_objects.keys() {
            let def = schema.resolve(name, &raw_objects, &mut Vec::new())?;
            schema.objects.insert(name.clone(), def);
        }

        let mut raw_events = BTreeMap::new();
        let mut files = Vec::new();
        json_files(&root.join("events"), &mut files)?;
        for file in files {
            let raw = read_json(&file)?;
            let name = raw
                .get("name")
                .and_then(Value::as_str)
                .with_context(|| format!("{}: no name", file.display()))?
                .to_string();
            raw_events.insert(name, raw);
        }
        for (name, raw) in &raw_events {
            // Only classes have a uid (the abstract category parents do not), and the base
            // event, which is class 0 of category 0.
            let uid = match raw.get("uid").and_then(Value::as_u64) {
                Some(uid) => uid,
                None if name == "base_event" => 0,
                None => continue,
            };
            let def = schema.resolve(name, &raw_events, &mut Vec::new())?;
            let category = def.category.clone().unwrap_or_default();
            let (category_uid, category_caption) = match category.as_str() {
                "other" => (0, "Uncategorized".to_string()),
                name => categories
                    .get(name)
                    .cloned()
                    .with_context(|| format!("class {name}: unknown category {category:?}"))?,
            };
            let class_uid = category_uid * 1000 + uid;
            schema.classes.insert(
                class_uid,
                Class {
                    name: name.clone(),
                    caption: raw
                        .get("caption")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    uid: class_uid,
                    category_uid,
                    category_caption,
                    def,
                },
            );
        }
        Ok(schema)
    }

    /// The schema version (`version.json`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The class with this `class_uid`: its name.
    pub fn class_name(&self, class_uid: u64) -> Option<&str> {
        self.classes.get(&class_uid).map(|c| c.name.as_str())
    }

    /// The required attributes of a class (those of profiles only when `profiles` names them).
    pub fn required(&self, class_uid: u64, profiles: &[&str]) -> Vec<String> {
        let Some(class) = self.classes.get(&class_uid) else {
            return Vec::new();
        };
        class
            .def
            .attributes
            .iter()
            .filter(|(_, a)| a.requirement() == "required")
            .filter(|(_, a)| a.profile.as_deref().is_none_or(|p| profiles.contains(&p)))
            .map(|(name, _)| name.clone())
            .collect()
    }

    fn resolve(
        &self,
        name: &str,
        raw: &BTreeMap<String, Map<String, Value>>,
        seen: &mut Vec<String>,
    ) -> Result<Definition> {
        if seen.iter().any(|s| s == name) {
            bail!("`extends` cycle through {name}");
        }
        seen.push(name.to_string());
        let file = raw
            .get(name)
            .with_context(|| format!("{name}: no definition file (extended but not copied?)"))?;
        let mut def = match file.get("extends").and_then(Value::as_str) {
            Some(parent) => self.resolve(parent, raw, seen)?,
            None => Definition::default(),
        };
        if let Some(category) = file.get("category").and_then(Value::as_str) {
            def.category = Some(category.to_string());
        }
        let attributes = file
            .get("attributes")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        // Includes first: the file's own attributes refine what they bring.
        for include in string_list(attributes.get("$include")) {
            let included = read_json(&self.root.join(&include))?;
            let profile = (included.get("meta").and_then(Value::as_str) == Some("profile"))
                .then(|| included.get("name").and_then(Value::as_str))
                .flatten()
                .map(str::to_string);
            for (key, value) in included
                .get("attributes")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                let Value::Object(value) = value else {
                    continue;
                };
                let entry = def
                    .overlays
                    .entry(key.clone())
                    .or_insert_with(|| (Map::new(), profile.clone()));
                merge(&mut entry.0, value);
                if entry.1.is_none() {
                    entry.1 = profile.clone();
                }
            }
        }
        for (key, value) in &attributes {
            if key == "$include" {
                continue;
            }
            let Value::Object(value) = value else {
                bail!("{name}.{key}: attribute definition is not an object");
            };
            let entry = def
                .overlays
                .entry(key.clone())
                .or_insert_with(|| (Map::new(), None));
            merge(&mut entry.0, value);
            if value.get("profile") == Some(&Value::Null) {
                entry.1 = None;
            }
        }
        if let Some(constraints) = file.get("constraints").and_then(Value::as_object) {
            if !constraints.is_empty() {
                def.at_least_one = string_list(constraints.get("at_least_one"));
                def.just_one = string_list(constraints.get("just_one"));
            }
        }
        def.attributes.clear();
        for (key, (overlay, profile)) in &def.overlays {
            let mut merged = match self.dictionary.get(key) {
                Some(Value::Object(d)) => d.clone(),
                _ => bail!("{name}.{key}: not in the dictionary"),
            };
            merge(&mut merged, overlay);
            def.attributes.insert(
                key.clone(),
                Attribute {
                    def: merged,
                    profile: profile.clone(),
                },
            );
        }
        seen.pop();
        Ok(def)
    }

    /// Every problem of `event` (empty when it conforms).
    pub fn check(&self, event: &Value) -> Vec<Problem> {
        let mut problems = Vec::new();
        let problem = |problems: &mut Vec<Problem>, path: &str, message: String| {
            problems.push(Problem {
                path: path.to_string(),
                message,
            })
        };
        let Some(object) = event.as_object() else {
            problem(&mut problems, "", "an event is a JSON object".into());
            return problems;
        };
        let Some(class_uid) = object.get("class_uid").and_then(Value::as_u64) else {
            problem(
                &mut problems,
                "class_uid",
                "missing or not an integer".into(),
            );
            return problems;
        };
        let Some(class) = self.classes.get(&class_uid) else {
            let known: Vec<_> = self.classes.keys().collect();
            problem(
                &mut problems,
                "class_uid",
                format!("{class_uid} is not a class of these schema files ({known:?})"),
            );
            return problems;
        };
        let profiles = string_list(event.pointer("/metadata/profiles"));
        for profile in &profiles {
            if !self.profiles.contains(profile) {
                let known: Vec<_> = self.profiles.iter().collect();
                problem(
                    &mut problems,
                    "metadata.profiles",
                    format!("unknown profile {profile:?} (known: {known:?})"),
                );
            }
        }
        let profiles: BTreeSet<&str> = profiles.iter().map(String::as_str).collect();
        self.check_object("", &class.def, object, &profiles, &mut problems);
        let mut problem = |path: &str, message: String| problem(&mut problems, path, message);
        if let Some(category) = object.get("category_uid").and_then(Value::as_u64) {
            if category != class.category_uid {
                problem(
                    "category_uid",
                    format!(
                        "{category}, but class {} ({}) is in category {}",
                        class.uid, class.name, class.category_uid
                    ),
                );
            }
        }
        if let (Some(activity), Some(type_uid)) = (
            object.get("activity_id").and_then(Value::as_u64),
            object.get("type_uid").and_then(Value::as_u64),
        ) {
            if type_uid != class.uid * 100 + activity {
                problem(
                    "type_uid",
                    format!(
                        "{type_uid}, but class_uid * 100 + activity_id is {}",
                        class.uid * 100 + activity
                    ),
                );
            }
        }
        let name = |key: &str| object.get(key).and_then(Value::as_str);
        if let Some(given) = name("class_name") {
            if given != class.caption {
                problem(
                    "class_name",
                    format!("{given:?}, but class {} is {:?}", class.uid, class.caption),
                );
            }
        }
        if let Some(given) = name("category_name") {
            if given != class.category_caption {
                problem(
                    "category_name",
                    format!(
                        "{given:?}, but category {} is {:?}",
                        class.category_uid, class.category_caption
                    ),
                );
            }
        }
        let activity_caption = object
            .get("activity_id")
            .map(Value::to_string)
            .and_then(|id| class.def.attributes.get("activity_id")?.caption_of(&id));
        if let (Some(given), Some(activity)) = (name("type_name"), activity_caption) {
            let expected = format!("{}: {activity}", class.caption);
            if given != expected {
                problem("type_name", format!("{given:?}, but expected {expected:?}"));
            }
        }
        if let Some(version) = event.pointer("/metadata/version").and_then(Value::as_str) {
            if version != self.version {
                problem(
                    "metadata.version",
                    format!("{version:?}, but these schema files are {:?}", self.version),
                );
            }
        }
        problems
    }

    fn check_object(
        &self,
        path: &str,
        def: &Definition,
        object: &Map<String, Value>,
        profiles: &BTreeSet<&str>,
        problems: &mut Vec<Problem>,
    ) {
        let at = |key: &str| {
            if path.is_empty() {
                key.to_string()
            } else {
                format!("{path}.{key}")
            }
        };
        for (key, value) in object {
            let Some(attribute) = def.attributes.get(key) else {
                problems.push(Problem {
                    path: at(key),
                    message: "not an attribute of this class or object".into(),
                });
                continue;
            };
            if let Some(profile) = &attribute.profile {
                if !profiles.contains(profile.as_str()) {
                    problems.push(Problem {
                        path: at(key),
                        message: format!(
                            "belongs to the profile {profile:?}, which metadata.profiles does not declare"
                        ),
                    });
                }
            }
            if let Some(deprecated) = attribute.def.get("@deprecated") {
                problems.push(Problem {
                    path: at(key),
                    message: format!("deprecated: {deprecated}"),
                });
            }
            if value.is_null() {
                problems.push(Problem {
                    path: at(key),
                    message: "null (leave an attribute out instead)".into(),
                });
                continue;
            }
            if path.is_empty() && GENERATED.contains(&key.as_str()) {
                if let Err(message) = self.check_type(attribute.type_name(), value) {
                    problems.push(Problem {
                        path: at(key),
                        message,
                    });
                }
                continue;
            }
            self.check_value(&at(key), attribute, value, profiles, problems);
        }
        for (key, attribute) in &def.attributes {
            let declared = attribute
                .profile
                .as_deref()
                .is_none_or(|p| profiles.contains(p));
            if attribute.requirement() == "required" && declared && !object.contains_key(key) {
                problems.push(Problem {
                    path: at(key),
                    message: "required attribute missing".into(),
                });
            }
            if path.is_empty() && GENERATED.contains(&key.as_str()) {
                continue;
            }
            // A caption sibling must say what the ID says (99, Other, is the source's own).
            if let (Some(sibling), Some(id)) = (
                attribute.def.get("sibling").and_then(Value::as_str),
                object.get(key),
            ) {
                let id = match id {
                    Value::Number(n) => n.to_string(),
                    Value::String(s) => s.clone(),
                    _ => continue,
                };
                if let (Some(caption), Some(given)) = (
                    attribute.caption_of(&id),
                    object.get(sibling).and_then(Value::as_str),
                ) {
                    if id != "99" && caption != given {
                        problems.push(Problem {
                            path: at(sibling),
                            message: format!("{given:?}, but {key} {id} is {caption:?}"),
                        });
                    }
                }
            }
        }
        let present = |key: &String| object.get(key).is_some_and(|v| !v.is_null());
        if !def.at_least_one.is_empty() && !def.at_least_one.iter().any(present) {
            problems.push(Problem {
                path: path.to_string(),
                message: format!("needs at least one of {:?}", def.at_least_one),
            });
        }
        if !def.just_one.is_empty() && def.just_one.iter().filter(|k| present(k)).count() != 1 {
            problems.push(Problem {
                path: path.to_string(),
                message: format!("needs exactly one of {:?}", def.just_one),
            });
        }
    }

    fn check_value(
        &self,
        path: &str,
        attribute: &Attribute,
        value: &Value,
        profiles: &BTreeSet<&str>,
        problems: &mut Vec<Problem>,
    ) {
        if attribute.is_array() {
            let Some(items) = value.as_array() else {
                problems.push(Problem {
                    path: path.to_string(),
                    message: format!("an array of {} expected", attribute.type_name()),
                });
                return;
            };
            for (i, item) in items.iter().enumerate() {
                self.check_one(&format!("{path}[{i}]"), attribute, item, profiles, problems);
            }
        } else {
            if value.is_array() {
                problems.push(Problem {
                    path: path.to_string(),
                    message: format!("one {} expected, not an array", attribute.type_name()),
                });
                return;
            }
            self.check_one(path, attribute, value, profiles, problems);
        }
    }

    fn check_one(
        &self,
        path: &str,
        attribute: &Attribute,
        value: &Value,
        profiles: &BTreeSet<&str>,
        problems: &mut Vec<Problem>,
    ) {
        let type_name = attribute.type_name();
        if type_name.ends_with("_t") {
            if let Err(message) = self.check_type(type_name, value) {
                problems.push(Problem {
                    path: path.to_string(),
                    message,
                });
                return;
            }
            if let Some(values) = attribute.enumeration() {
                let key = match value {
                    Value::Number(n) => n.to_string(),
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                if !values.contains_key(&key) {
                    problems.push(Problem {
                        path: path.to_string(),
                        message: format!(
                            "{key} is not one of the enum's values {:?}",
                            values.keys().collect::<Vec<_>>()
                        ),
                    });
                }
            }
        } else if type_name == "object" {
            // The generic object (`unmapped`): any JSON object.
            if !value.is_object() {
                problems.push(Problem {
                    path: path.to_string(),
                    message: "an object expected".into(),
                });
            }
        } else {
            let Some(def) = self.objects.get(type_name) else {
                problems.push(Problem {
                    path: path.to_string(),
                    message: format!(
                        "object type {type_name:?} has no definition file in {} (copy objects/{type_name}.json)",
                        self.root.display()
                    ),
                });
                return;
            };
            let Some(object) = value.as_object() else {
                problems.push(Problem {
                    path: path.to_string(),
                    message: format!("a {type_name} object expected"),
                });
                return;
            };
            self.check_object(path, def, object, profiles, problems);
        }
    }

    /// `value` against a data type: its base type, then the type's regex, maximum length,
    /// range and values.
    fn check_type(&self, type_name: &str, value: &Value) -> Result<(), String> {
        let ok = match type_name {
            "string_t" => value.is_string(),
            "integer_t" | "long_t" => value.is_i64() || value.is_u64(),
            "float_t" => value.is_number(),
            "boolean_t" => value.is_boolean(),
            "json_t" => true,
            _ => {
                let Some(Value::Object(def)) = self.types.get(type_name) else {
                    return Err(format!("unknown data type {type_name}"));
                };
                if let Some(base) = def.get("type").and_then(Value::as_str) {
                    self.check_type(base, value)?;
                }
                if let (Some(pattern), Some(text)) =
                    (def.get("regex").and_then(Value::as_str), value.as_str())
                {
                    let mut cache = self.regexes.lock().expect("regex cache");
                    if !cache.contains_key(pattern) {
                        let compiled = regex::Regex::new(pattern)
                            .map_err(|e| format!("{type_name}'s regex does not compile: {e}"))?;
                        cache.insert(pattern.to_string(), compiled);
                    }
                    if !cache[pattern].is_match(text) {
                        return Err(format!("{text:?} is not a valid {type_name}"));
                    }
                }
                if let (Some(max), Some(text)) =
                    (def.get("max_len").and_then(Value::as_u64), value.as_str())
                {
                    if text.chars().count() as u64 > max {
                        return Err(format!("longer than {max} characters ({type_name})"));
                    }
                }
                if let (Some(range), Some(n)) =
                    (def.get("range").and_then(Value::as_array), value.as_f64())
                {
                    let lo = range.first().and_then(Value::as_f64).unwrap_or(f64::MIN);
                    let hi = range.get(1).and_then(Value::as_f64).unwrap_or(f64::MAX);
                    if n < lo || n > hi {
                        return Err(format!("{n} is outside {type_name}'s range {lo}..={hi}"));
                    }
                }
                if let Some(values) = def.get("values").and_then(Value::as_array) {
                    if !values.contains(value) {
                        return Err(format!("{value} is not one of {type_name}'s values"));
                    }
                }
                return Ok(());
            }
        };
        if ok {
            Ok(())
        } else {
            Err(format!("{value} is not a {type_name}"))
        }
    }
}

/// The OCSF files this repository ships (`enforcer/data/ocsf/<version>`), from the source tree.
pub fn shipped_schema_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/ocsf")
        .join(super::SCHEMA_VERSION)
}
