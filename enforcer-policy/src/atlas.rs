//! MITRE ATLAS techniques, from the data the project ships (`data/atlas/`, Apache-2.0).
//!
//! Lookups read `techniques.tsv`, a flat table derived from the official `ATLAS.yaml`; a unit
//! test checks every row against `ATLAS.yaml`, so the derived file cannot drift.

use std::collections::HashMap;
use std::sync::OnceLock;

/// One technique as events and `explain` report it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct AtlasTechnique {
    pub id: String,
    pub name: String,
    pub tactics: Vec<String>,
}

const TSV: &str = include_str!("../data/atlas/techniques.tsv");

/// The ATLAS data version (the `version:` field of `ATLAS.yaml`).
pub fn version() -> &'static str {
    "5.6.0"
}

fn table() -> &'static HashMap<&'static str, AtlasTechnique> {
    static TABLE: OnceLock<HashMap<&'static str, AtlasTechnique>> = OnceLock::new();
    TABLE.get_or_init(|| {
        TSV.lines()
            .skip(1) // header
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                let cols: Vec<&str> = line.split('\t').collect();
                let tactics = cols
                    .get(2)
                    .map(|t| {
                        t.split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default();
                (
                    cols[0],
                    AtlasTechnique {
                        id: cols[0].to_string(),
                        name: cols.get(1).copied().unwrap_or_default().to_string(),
                        tactics,
                    },
                )
            })
            .collect()
    })
}

/// The technique or sub-technique with this exact ID (`AML.T0085.000`).
pub fn lookup(id: &str) -> Option<AtlasTechnique> {
    table().get(id).cloned()
}

/// The known techniques among `ids`, in order (unknown IDs are reported at load).
pub(crate) fn lookup_all(ids: &[String]) -> Vec<AtlasTechnique> {
    ids.iter().filter_map(|i| lookup(i)).collect()
}

/// Where a technique sits in the matrix, for outputs that name tactics and parents by ID
/// (OCSF's `attacks[]`): its tactic IDs, in the order of [`AtlasTechnique::tactics`], and, for a
/// sub-technique, its parent technique.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub tactic_ids: Vec<&'static str>,
    pub parent: Option<AtlasTechnique>,
}

/// The [`Placement`] of the technique or sub-technique with this exact ID.
pub fn placement(id: &str) -> Option<Placement> {
    static PLACEMENTS: OnceLock<HashMap<&'static str, (Vec<&'static str>, &'static str)>> =
        OnceLock::new();
    let placements = PLACEMENTS.get_or_init(|| {
        TSV.lines()
            .skip(1) // header
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                let cols: Vec<&'static str> = line.split('\t').collect();
                let tactic_ids = cols
                    .get(3)
                    .map(|t| t.split(',').filter(|s| !s.is_empty()).collect())
                    .unwrap_or_default();
                (
                    cols[0],
                    (tactic_ids, cols.get(4).copied().unwrap_or_default()),
                )
            })
            .collect()
    });
    let (tactic_ids, parent) = placements.get(id)?;
    Some(Placement {
        tactic_ids: tactic_ids.clone(),
        parent: (!parent.is_empty()).then(|| lookup(parent)).flatten(),
    })
}

/// Every known technique ID, sorted (for hints).
pub fn ids() -> Vec<&'static str> {
    let mut ids: Vec<&'static str> = table().keys().copied().collect();
    ids.sort_unstable();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;
    use yaml_rust2::{Yaml, YamlLoader};

    #[test]
    fn lookup_rag_databases() {
        let t = lookup("AML.T0085.000").unwrap();
        assert_eq!(t.name, "RAG Databases");
        assert_eq!(t.tactics, vec!["Collection".to_string()]);
        let t = lookup("AML.T0012").unwrap();
        assert_eq!(t.name, "Valid Accounts");
        assert_eq!(t.tactics, vec!["Initial Access", "Privilege Escalation"]);
        assert!(lookup("AML.T9999").is_none());
        let placed = placement("AML.T0085.000").unwrap();
        assert_eq!(placed.tactic_ids, vec!["AML.TA0009"]);
        assert_eq!(placed.parent.unwrap().name, "Data from AI Services");
        let placed = placement("AML.T0012").unwrap();
        assert_eq!(placed.tactic_ids, vec!["AML.TA0004", "AML.TA0012"]);
        assert_eq!(placed.parent, None);
        assert!(placement("AML.T9999").is_none());
        assert!(lookup("aml.t0012").is_none());
        assert_eq!(ids().len(), 170);
    }

    /// The TSV is derived data: every row's id, name and tactics must match ATLAS.yaml.
    #[test]
    fn tsv_matches_atlas_yaml() {
        let text = include_str!("../data/atlas/ATLAS.yaml");
        let docs = YamlLoader::load_from_str(text).unwrap();
        let doc = &docs[0];
        assert_eq!(doc["version"].as_str(), Some(version()));
        let matrix = &doc["matrices"][0];
        let tactic_names: HashMap<&str, &str> = matrix["tactics"]
            .as_vec()
            .unwrap()
            .iter()
            .map(|t| (t["id"].as_str().unwrap(), t["name"].as_str().unwrap()))
            .collect();
        let techniques: HashMap<&str, &Yaml> = matrix["techniques"]
            .as_vec()
            .unwrap()
            .iter()
            .map(|t| (t["id"].as_str().unwrap(), t))
            .collect();
        let tactic_ids_of = |t: &Yaml| -> Vec<String> {
            // Sub-techniques inherit their parent's tactics.
            let t = match t["subtechnique-of"].as_str() {
                Some(parent) => techniques[parent],
                None => t,
            };
            t["tactics"]
                .as_vec()
                .unwrap()
                .iter()
                .map(|id| id.as_str().unwrap().to_string())
                .collect()
        };
        let tactics_of = |t: &Yaml| -> Vec<String> {
            tactic_ids_of(t)
                .iter()
                .map(|id| tactic_names[id.as_str()].to_string())
                .collect()
        };
        assert_eq!(table().len(), techniques.len());
        for (id, row) in table() {
            let t = techniques
                .get(id)
                .unwrap_or_else(|| panic!("{id} not in ATLAS.yaml"));
            assert_eq!(t["name"].as_str(), Some(row.name.as_str()), "{id}");
            assert_eq!(tactics_of(t), row.tactics, "{id}");
            let placed = placement(id).unwrap();
            assert_eq!(placed.tactic_ids, tactic_ids_of(t), "{id}");
            assert_eq!(
                placed.parent.map(|p| p.id),
                t["subtechnique-of"].as_str().map(str::to_string),
                "{id}"
            );
        }
    }
}
