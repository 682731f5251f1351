//! Which linear modules get an adapter, decided by PEFT's rules, so that a `target_modules` /
//! `exclude_modules` / `layers_to_transform` / `layers_pattern` set picks the same modules here as
//! in stock PEFT (tests/targets.rs checks every case of tests/data/targets/cases.json, PEFT's own
//! decisions). A module is named by its HF path, e.g. `model.layers.3.self_attn.q_proj`.
//!
//! The rules, in the order they apply to one module path `key`:
//!
//! 1. `exclude` first. A list of names excludes `key` when it equals a name or ends with
//!    `"." + name`; a regular expression excludes it when it matches the whole key.
//! 2. `modules`:
//!    - a list of names: `key` equal to a name is selected outright (no layer filter); `key`
//!      ending with `"." + name` is selected subject to the layer filter below;
//!    - a regular expression: selected when it matches the whole key (Python's `re.fullmatch`);
//!    - `all-linear`: every linear except the output head (the caller passes linears only and
//!      never the head).
//! 3. The layer filter (names only; PEFT refuses it with a regex or `all-linear`): when `layers`
//!    is a non-empty list, the key's layer index must be in it. The index is the first number
//!    segment after `.<layers_pattern>.` (the pattern is itself a regular expression, inserted as
//!    PEFT inserts it: `(?:^|.*?\.)<pattern>\.(\d+)\.` anchored at the start), or without a
//!    pattern the first `<segment>.<number>.` after at least one dot. No index: not selected.
//!    An empty `layers` list means no filter, as in PEFT.
//!
//! `layers_pattern` without `layers` is refused, as PEFT refuses it. Regular expressions use the
//! `regex` crate: Python's `re` syntax without look-around and back-references; such a pattern is
//! refused with an error naming it, never matched differently.

use std::fmt;

use regex::Regex;
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};

/// The seven linears of a Llama-style layer, the expansion of the CLI's `all`.
pub const LLAMA_NAMES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// A set of modules: PEFT's `target_modules` / `exclude_modules` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Modules {
    /// Module names, each matching a key equal to it or ending with `"." + name`.
    Names(Vec<String>),
    /// A regular expression that must match the whole key.
    Regex(String),
    /// Every linear but the output head (PEFT's `"all-linear"`, any letter case).
    AllLinear,
}

/// Which modules get an adapter: the selection keys of PEFT's `adapter_config.json`.
///
/// The fields are plain data; [`TargetSpec::new`], [`TargetSpec::parse`] and
/// [`TargetSpec::from_peft_config`] validate them (and compile every regular expression once, to
/// report a bad one by name). [`TargetSpec::matcher`] compiles them for many lookups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetSpec {
    pub modules: Modules,
    pub exclude: Option<Modules>,
    /// `layers_to_transform`: layer indices (names only).
    pub layers: Option<Vec<usize>>,
    /// `layers_pattern`: the name of the layer list in the key (`layers`, `h`, …); a regular
    /// expression, as in PEFT.
    pub layers_pattern: Option<String>,
}

/// A validated [`TargetSpec`] with its regular expressions compiled.
#[derive(Clone, Debug)]
pub struct TargetMatcher {
    modules: Compiled,
    exclude: Option<Compiled>,
    /// The allowed layer indices and the expression whose group `idx` is the key's layer index;
    /// `None` when there is no layer filter.
    layers: Option<(Vec<usize>, Regex)>,
}

#[derive(Clone, Debug)]
enum Compiled {
    Names(Vec<String>),
    Regex(Regex),
    All,
}

const OP: &str = "targets";

/// `^(?:pattern)$`: the whole-key match of Python's `re.fullmatch`.
fn full_match_regex(what: &str, pattern: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| Error::invalid(OP, format!("{what} regular expression `{pattern}` does not compile: {e}")))
}

/// Whether `key` is `name` or ends with `"." + name`.
fn name_matches(key: &str, name: &str) -> bool {
    key == name || (key.len() > name.len() && key.ends_with(name) && key.as_bytes()[key.len() - name.len() - 1] == b'.')
}

impl Compiled {
    fn new(what: &str, m: &Modules) -> Result<Self> {
        Ok(match m {
            Modules::Names(n) => Compiled::Names(n.clone()),
            Modules::Regex(p) => Compiled::Regex(full_match_regex(what, p)?),
            Modules::AllLinear => Compiled::All,
        })
    }
}

impl TargetSpec {
    /// A validated spec (see the module docs for what PEFT refuses).
    pub fn new(modules: Modules, exclude: Option<Modules>, layers: Option<Vec<usize>>, layers_pattern: Option<String>) -> Result<Self> {
        let spec = TargetSpec { modules, exclude, layers, layers_pattern };
        spec.matcher()?;
        Ok(spec)
    }

    /// Names only, no exclusions or layer filter.
    pub fn names<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Result<Self> {
        Self::new(Modules::Names(names.into_iter().map(Into::into).collect()), None, None, None)
    }

    /// Checks the combination and compiles the regular expressions.
    pub fn matcher(&self) -> Result<TargetMatcher> {
        let pattern = self.layers_pattern.as_deref().filter(|p| !p.is_empty());
        match &self.modules {
            Modules::Names(n) if n.is_empty() => return Err(Error::invalid(OP, "target_modules is an empty list: no module would get an adapter")),
            Modules::Names(n) => {
                if let Some(bad) = n.iter().find(|s| s.is_empty() || s.chars().any(char::is_whitespace)) {
                    return Err(Error::invalid(OP, format!("target_modules: `{bad}` is not a module name (empty or with spaces)")));
                }
            }
            Modules::Regex(_) | Modules::AllLinear => {
                let what = if self.modules == Modules::AllLinear { "all-linear" } else { "a regular expression" };
                if self.layers.is_some() {
                    return Err(Error::invalid(OP, format!("layers_to_transform needs target_modules as a list of names, not {what} (as in PEFT)")));
                }
                if self.layers_pattern.is_some() {
                    return Err(Error::invalid(OP, format!("layers_pattern needs target_modules as a list of names, not {what} (as in PEFT)")));
                }
            }
        }
        if pattern.is_some() && self.layers.is_none() {
            return Err(Error::invalid(OP, "layers_pattern is set without layers_to_transform (PEFT refuses it too)"));
        }
        if self.exclude == Some(Modules::AllLinear) {
            return Err(Error::invalid(OP, "exclude_modules cannot be all-linear (it would exclude every module)"));
        }
        let modules = Compiled::new("target_modules", &self.modules)?;
        let exclude = self.exclude.as_ref().map(|e| Compiled::new("exclude_modules", e)).transpose()?;
        let layers = match &self.layers {
            Some(l) if !l.is_empty() => {
                // PEFT: re.match (anchored at the start) of `(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.`, or
                // without a pattern `.*?\.[^.]*\.(?P<idx>\d+)\.`; the lazy `.*?` takes the first index.
                let src = match pattern {
                    Some(p) => format!(r"^(?:(?:^|.*?\.){p}\.(?P<idx>\d+)\.)"),
                    None => r"^(?:.*?\.[^.]*\.(?P<idx>\d+)\.)".to_string(),
                };
                let re = Regex::new(&src)
                    .map_err(|e| Error::invalid(OP, format!("layers_pattern `{}` does not compile as a regular expression: {e}", pattern.unwrap_or(""))))?;
                Some((l.clone(), re))
            }
            _ => None,
        };
        Ok(TargetMatcher { modules, exclude, layers })
    }

    /// Whether the linear module at `path` (e.g. `model.layers.3.self_attn.q_proj`) gets an
    /// adapter. Compiles the spec on each call: for many paths, use [`TargetSpec::matcher`] or
    /// [`TargetSpec::select`].
    pub fn selects(&self, path: &str) -> Result<bool> {
        Ok(self.matcher()?.selects(path))
    }

    /// The paths among `paths` (the model's linear modules, output head left out) that get an
    /// adapter, in their order. None selected is an error naming the spec, as in PEFT.
    pub fn select<'a>(&self, paths: impl IntoIterator<Item = &'a str>) -> Result<Vec<&'a str>> {
        let m = self.matcher()?;
        let mut seen = 0usize;
        let mut first = None;
        let chosen: Vec<&str> = paths
            .into_iter()
            .inspect(|p| {
                seen += 1;
                first.get_or_insert(*p);
            })
            .filter(|p| m.selects(p))
            .collect();
        if chosen.is_empty() {
            let example = first.map(|p| format!(" (its module paths look like `{p}`)")).unwrap_or_default();
            return Err(Error::invalid(OP, format!("targets `{self}` select none of the model's {seen} linear modules{example}")));
        }
        Ok(chosen)
    }

    /// For a list of names: every name must match at least one of `paths` (the model's linear
    /// modules), so a typo (`q_prj`) or a module another family has (`qkv_proj` on Llama) is an
    /// error naming it and the module names there are, not a silently smaller adapter.
    pub fn check_names(&self, paths: &[&str]) -> Result<()> {
        let lists = [Some(&self.modules), self.exclude.as_ref()];
        for n in lists.into_iter().flatten().filter_map(|m| if let Modules::Names(n) = m { Some(n) } else { None }).flatten() {
            if !paths.iter().any(|p| p == n || name_matches(p, n)) {
                let mut modules: Vec<&str> = paths.iter().map(|p| p.rsplit('.').next().unwrap_or(p)).collect();
                modules.sort_unstable();
                modules.dedup();
                return Err(Error::invalid(OP, format!("unknown module `{n}`: it matches none of the model's linears ({})", modules.join(", "))));
            }
        }
        Ok(())
    }

    /// The `--targets` value: a comma-separated list of module names (`q_proj,v_proj`; the short
    /// forms `q, k, v, o, gate, up, down` stand for `q_proj` … `down_proj`, and `all` for all
    /// seven), `all-linear`, or `re:<regular expression>` (matching the whole module path).
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        let bad = |msg: String| Error::invalid(OP, format!("--targets `{s}`: {msg}"));
        if s.eq_ignore_ascii_case("all-linear") {
            return Ok(TargetSpec { modules: Modules::AllLinear, exclude: None, layers: None, layers_pattern: None });
        }
        if let Some(re) = s.strip_prefix("re:") {
            if re.is_empty() {
                return Err(bad("`re:` needs a regular expression after it".into()));
            }
            return Self::new(Modules::Regex(re.to_string()), None, None, None);
        }
        let mut names: Vec<String> = Vec::new();
        for t in s.split(',').map(str::trim) {
            let expanded: Vec<&str> = match t {
                "" => return Err(bad("an empty name (a list is `q_proj,v_proj`, or use all-linear or re:<regex>)".into())),
                "all" => LLAMA_NAMES.to_vec(),
                "q" => vec!["q_proj"],
                "k" => vec!["k_proj"],
                "v" => vec!["v_proj"],
                "o" => vec!["o_proj"],
                "gate" => vec!["gate_proj"],
                "up" => vec!["up_proj"],
                "down" => vec!["down_proj"],
                name if name.chars().any(char::is_whitespace) => return Err(bad(format!("`{name}` is not a module name"))),
                name => vec![name],
            };
            for n in expanded {
                if !names.iter().any(|m| m == n) {
                    names.push(n.to_string());
                }
            }
        }
        Self::new(Modules::Names(names), None, None, None)
    }

    /// The selection keys of PEFT's `adapter_config.json`: `target_modules` (a list of names, a
    /// regular expression string, or `"all-linear"`), `exclude_modules`, `layers_to_transform`,
    /// `layers_pattern` (null when unset).
    pub fn to_peft_json(&self) -> Value {
        fn modules(m: &Modules) -> Value {
            match m {
                Modules::Names(n) => json!(n),
                Modules::Regex(r) => json!(r),
                Modules::AllLinear => json!("all-linear"),
            }
        }
        json!({
            "target_modules": modules(&self.modules),
            "exclude_modules": self.exclude.as_ref().map(modules),
            "layers_to_transform": self.layers,
            "layers_pattern": self.layers_pattern,
        })
    }

    /// The spec of an `adapter_config.json` (its top-level object), read as PEFT reads it: a
    /// string `target_modules` is `all-linear` (any case) or a regular expression, a list is
    /// names; `layers_to_transform` may be one index; `layers_pattern` may be a one-element list.
    pub fn from_peft_config(config: &Map<String, Value>) -> Result<Self> {
        let bad = |key: &str, msg: String| Error::invalid(OP, format!("adapter_config.json `{key}`: {msg}"));
        let get = |key: &str| config.get(key).filter(|v| !v.is_null());
        let names = |key: &str, a: &[Value]| -> Result<Vec<String>> {
            a.iter().map(|v| v.as_str().map(str::to_string).ok_or_else(|| bad(key, format!("expected a list of module names, found {v}")))).collect()
        };
        let modules = match get("target_modules") {
            None => return Err(bad("target_modules", "missing (PEFT falls back to a per-model-type default; spectune needs the modules named)".into())),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("all-linear") => Modules::AllLinear,
            Some(Value::String(s)) => Modules::Regex(s.clone()),
            Some(Value::Array(a)) => Modules::Names(names("target_modules", a)?),
            Some(v) => return Err(bad("target_modules", format!("expected a list of names or a string, found {v}"))),
        };
        let exclude = match get("exclude_modules") {
            None => None,
            // PEFT does not expand "all-linear" here: a string is a regular expression.
            Some(Value::String(s)) => Some(Modules::Regex(s.clone())),
            Some(Value::Array(a)) if a.is_empty() => None,
            Some(Value::Array(a)) => Some(Modules::Names(names("exclude_modules", a)?)),
            Some(v) => return Err(bad("exclude_modules", format!("expected a list of names or a string, found {v}"))),
        };
        let index = |v: &Value| {
            v.as_u64()
                .and_then(|i| usize::try_from(i).ok())
                .ok_or_else(|| bad("layers_to_transform", format!("expected a layer index (an integer ≥ 0), found {v}")))
        };
        let layers = match get("layers_to_transform") {
            None => None,
            Some(Value::Array(a)) => Some(a.iter().map(index).collect::<Result<Vec<_>>>()?),
            Some(v) => Some(vec![index(v)?]),
        };
        let layers_pattern = match get("layers_pattern") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(a)) => match a.as_slice() {
                [] => None,
                [Value::String(s)] => Some(s.clone()),
                _ => return Err(bad("layers_pattern", format!("expected one pattern, found {}", Value::Array(a.clone())))),
            },
            Some(v) => return Err(bad("layers_pattern", format!("expected a string, found {v}"))),
        };
        Self::new(modules, exclude, layers, layers_pattern)
    }
}

/// The `--targets` form of the modules, then any exclusion and layer filter.
impl fmt::Display for TargetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn modules(f: &mut fmt::Formatter<'_>, m: &Modules) -> fmt::Result {
            match m {
                Modules::Names(n) => write!(f, "{}", n.join(",")),
                Modules::Regex(r) => write!(f, "re:{r}"),
                Modules::AllLinear => write!(f, "all-linear"),
            }
        }
        modules(f, &self.modules)?;
        if let Some(e) = &self.exclude {
            write!(f, "; exclude ")?;
            modules(f, e)?;
        }
        if let Some(l) = &self.layers {
            write!(f, "; layers {l:?}")?;
        }
        if let Some(p) = &self.layers_pattern {
            write!(f, " under `{p}`")?;
        }
        Ok(())
    }
}

impl TargetMatcher {
    /// Whether the linear module at `path` gets an adapter (the rules of the module docs).
    pub fn selects(&self, path: &str) -> bool {
        let excluded = match &self.exclude {
            None => false,
            Some(Compiled::Names(n)) => n.iter().any(|n| name_matches(path, n)),
            Some(Compiled::Regex(r)) => r.is_match(path),
            Some(Compiled::All) => true,
        };
        if excluded {
            return false;
        }
        match &self.modules {
            Compiled::All => true,
            Compiled::Regex(r) => r.is_match(path),
            // An exact name is selected without the layer filter (PEFT's order of checks).
            Compiled::Names(n) if n.iter().any(|n| n == path) => true,
            Compiled::Names(n) => {
                n.iter().any(|n| name_matches(path, n))
                    && match &self.layers {
                        None => true,
                        Some((allowed, re)) => {
                            re.captures(path).and_then(|c| c.name("idx")).and_then(|i| i.as_str().parse::<usize>().ok()).is_some_and(|i| allowed.contains(&i))
                        }
                    }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Modules {
        Modules::Names(n.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn names_match_whole_dotted_suffixes_only() {
        let s = TargetSpec::names(["q_proj", "self_attn.v_proj"]).unwrap();
        assert!(s.selects("model.layers.0.self_attn.q_proj").unwrap());
        assert!(s.selects("q_proj").unwrap());
        assert!(s.selects("model.layers.7.self_attn.v_proj").unwrap());
        assert!(!s.selects("model.layers.0.self_attn.xq_proj").unwrap());
        assert!(!s.selects("model.layers.0.self_attn.q_proj.base").unwrap());
        assert!(!s.selects("model.layers.0.mlp.v_proj_extra").unwrap());
        assert!(!s.selects("model.layers.0.xself_attn.v_proj").unwrap());
    }

    #[test]
    fn regex_must_match_the_whole_key() {
        let s = TargetSpec::parse(r"re:.*\.(q|v)_proj").unwrap();
        assert!(s.selects("model.layers.0.self_attn.q_proj").unwrap());
        assert!(!s.selects("model.layers.0.self_attn.q_proj.lora").unwrap());
        assert!(!s.selects("model.layers.0.self_attn.k_proj").unwrap());
        // `a|b` is one alternative of the whole key, not a prefix search.
        let s = TargetSpec::parse("re:q_proj|model.layers.1.mlp.up_proj").unwrap();
        assert!(s.selects("q_proj").unwrap());
        assert!(!s.selects("model.layers.0.self_attn.q_proj").unwrap());
        assert!(s.selects("model.layers.1.mlp.up_proj").unwrap());
    }

    #[test]
    fn exclude_applies_first_in_both_forms() {
        let s = TargetSpec::new(names(&["q_proj", "v_proj"]), Some(names(&["v_proj"])), None, None).unwrap();
        assert!(!s.selects("model.layers.0.self_attn.v_proj").unwrap());
        assert!(s.selects("model.layers.0.self_attn.q_proj").unwrap());
        let s = TargetSpec::new(Modules::AllLinear, Some(Modules::Regex(r".*\.layers\.0\..*".into())), None, None).unwrap();
        assert!(!s.selects("model.layers.0.mlp.down_proj").unwrap());
        assert!(s.selects("model.layers.1.mlp.down_proj").unwrap());
    }

    #[test]
    fn layer_filter_takes_the_first_index_after_the_pattern() {
        let s = TargetSpec::new(names(&["down_proj", "q_proj"]), None, Some(vec![1]), Some("layers".into())).unwrap();
        assert!(s.selects("model.layers.1.mlp.down_proj").unwrap());
        assert!(s.selects("model.layers.1.mlp.experts.0.down_proj").unwrap());
        assert!(!s.selects("model.layers.0.mlp.experts.1.down_proj").unwrap());
        assert!(!s.selects("model.layers.10.self_attn.q_proj").unwrap());
        // An exact key skips the layer filter; a key without an index is not selected.
        assert!(s.selects("q_proj").unwrap());
        assert!(!s.selects("encoder.q_proj").unwrap());
        // Without a pattern: the first `<segment>.<number>.` after a dot.
        let s = TargetSpec::new(names(&["c_attn"]), None, Some(vec![3]), None).unwrap();
        assert!(s.selects("transformer.h.3.attn.c_attn").unwrap());
        assert!(!s.selects("h.3.attn.c_attn").unwrap());
        // An empty list is no filter.
        let s = TargetSpec::new(names(&["q_proj"]), None, Some(vec![]), None).unwrap();
        assert!(s.selects("model.layers.5.self_attn.q_proj").unwrap());
    }

    #[test]
    fn what_peft_refuses_is_refused_by_name() {
        let err = |r: Result<TargetSpec>| r.unwrap_err().to_string();
        assert!(err(TargetSpec::new(Modules::Regex(".*".into()), None, Some(vec![0]), None)).contains("layers_to_transform"));
        assert!(err(TargetSpec::new(Modules::AllLinear, None, None, Some("layers".into()))).contains("layers_pattern"));
        assert!(err(TargetSpec::new(names(&["q_proj"]), None, None, Some("layers".into()))).contains("layers_pattern"));
        assert!(err(TargetSpec::parse("re:model.(layers")).contains("`model.(layers`"));
        assert!(err(TargetSpec::new(names(&["q"]), Some(Modules::Regex("(x".into())), None, None)).contains("exclude_modules"));
        assert!(err(TargetSpec::new(names(&["q"]), None, Some(vec![0]), Some("la(yers".into()))).contains("`la(yers`"));
        // Look-around is Python-only: refused, not silently mis-matched.
        assert!(err(TargetSpec::parse("re:(?!lm_head).*")).contains("does not compile"));
        // A spec built field by field is checked when used.
        let raw = TargetSpec { modules: Modules::Regex("(".into()), exclude: None, layers: None, layers_pattern: None };
        assert!(raw.selects("q_proj").is_err());
    }

    #[test]
    fn cli_forms_old_and_new() {
        let n = |s: &str| match TargetSpec::parse(s).unwrap().modules {
            Modules::Names(n) => n,
            m => panic!("{s}: {m:?}"),
        };
        assert_eq!(n("q,k,v,o,gate,up,down"), LLAMA_NAMES);
        assert_eq!(n("all"), LLAMA_NAMES);
        assert_eq!(n(" q_proj , v "), ["q_proj", "v_proj"]);
        assert_eq!(n("q,q_proj,qkv_proj,gate_up_proj"), ["q_proj", "qkv_proj", "gate_up_proj"]);
        assert_eq!(TargetSpec::parse("All-Linear").unwrap().modules, Modules::AllLinear);
        assert_eq!(TargetSpec::parse("re:.*mlp.*").unwrap().modules, Modules::Regex(".*mlp.*".into()));
        for bad in ["", "q,,v", "re:", "q proj"] {
            assert!(TargetSpec::parse(bad).unwrap_err().to_string().contains("--targets"), "{bad:?}");
        }
    }

    #[test]
    fn peft_json_round_trips() {
        let specs = [
            TargetSpec::parse("q,v").unwrap(),
            TargetSpec::parse("all-linear").unwrap(),
            TargetSpec::parse(r"re:.*\.mlp\..*").unwrap(),
            TargetSpec::new(names(&["q_proj"]), Some(Modules::Regex(".*0.*".into())), Some(vec![0, 2]), Some("layers".into())).unwrap(),
            TargetSpec::new(Modules::AllLinear, Some(names(&["o_proj"])), None, None).unwrap(),
        ];
        for s in specs {
            let v = s.to_peft_json();
            let back = TargetSpec::from_peft_config(v.as_object().unwrap()).unwrap();
            assert_eq!(back, s, "{v}");
        }
        let v = TargetSpec::parse("q").unwrap().to_peft_json();
        assert_eq!(v, json!({"target_modules": ["q_proj"], "exclude_modules": null, "layers_to_transform": null, "layers_pattern": null}));
    }

    #[test]
    fn peft_config_forms_and_bad_values() {
        let read = |v: Value| TargetSpec::from_peft_config(v.as_object().unwrap());
        let s = read(json!({"target_modules": ["q_proj"], "layers_to_transform": 2, "layers_pattern": ["layers"]})).unwrap();
        assert_eq!((s.layers, s.layers_pattern.as_deref()), (Some(vec![2]), Some("layers")));
        assert_eq!(read(json!({"target_modules": "ALL-LINEAR", "exclude_modules": []})).unwrap().exclude, None);
        assert_eq!(read(json!({"target_modules": "q", "exclude_modules": "all-linear"})).unwrap().exclude, Some(Modules::Regex("all-linear".into())));
        for (v, word) in [
            (json!({}), "target_modules"),
            (json!({"target_modules": null}), "target_modules"),
            (json!({"target_modules": 3}), "target_modules"),
            (json!({"target_modules": ["q", 1]}), "target_modules"),
            (json!({"target_modules": []}), "empty"),
            (json!({"target_modules": ["q"], "layers_to_transform": [-1]}), "layers_to_transform"),
            (json!({"target_modules": ["q"], "layers_to_transform": [0], "layers_pattern": ["a", "b"]}), "layers_pattern"),
            (json!({"target_modules": ["q"], "exclude_modules": {"a": 1}}), "exclude_modules"),
        ] {
            let e = read(v.clone()).unwrap_err().to_string();
            assert!(e.contains(word), "{v}: {e}");
        }
    }

    #[test]
    fn select_refuses_an_empty_selection_naming_the_spec() {
        let paths = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"];
        assert_eq!(TargetSpec::parse("down").unwrap().select(paths).unwrap(), ["model.layers.0.mlp.down_proj"]);
        let e = TargetSpec::parse("qkv_proj").unwrap().select(paths).unwrap_err().to_string();
        assert!(e.contains("qkv_proj") && e.contains("model.layers.0.self_attn.q_proj") && e.contains("2 linear"), "{e}");
    }
}
