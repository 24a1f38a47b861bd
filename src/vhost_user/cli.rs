//! `vmm device <kind> --socket PATH [--KEY VALUE …]`: the subcommands and their options,
//! generated from the device registry. A kind's options are the keys of its machine-file table
//! (from its JSON Schema, with their docs as help), so a device is described the same way in a
//! machine file and on a command line, and goes through the same checks
//! ([`crate::contract::DeviceSpec::check`]) before it is served.
//!
//! Spelling: `--key value` for `key = "value"` (`_` becomes `-`), `--flag` for `flag = true`,
//! `--key sub=value` for `key = { sub = "value" }` where the key takes a table.

use std::path::PathBuf;

use clap::{Arg, ArgAction, ArgMatches, Command};
use serde_json::{Map, Value};

use crate::devices::DeviceKind;

/// Keys that place a device in a VM and mean nothing to a backend.
const PLACEMENT_KEYS: &[&str] = &["slot"];

/// A `vmm device` invocation that could not start: exit code and message.
#[derive(Debug)]
pub struct Failed {
    /// 2: the options are wrong (nothing was served); 1: serving failed.
    pub code: u8,
    pub message: String,
}

/// The kinds `vmm device` serves.
pub fn kinds() -> impl Iterator<Item = DeviceKind> {
    DeviceKind::ALL
        .iter()
        .copied()
        .filter(|k| k.info().vhost_user.is_some())
}

/// One subcommand per kind that can be served.
pub fn subcommands() -> Vec<Command> {
    kinds().map(subcommand).collect()
}

/// The options of a kind: its keys, less placement and what the front end owns.
fn options(kind: DeviceKind, schema: &Value) -> Vec<(String, &Value)> {
    let owned = kind
        .info()
        .vhost_user
        .as_ref()
        .map_or(&[][..], |s| s.front_end_keys);
    properties(schema)
        .into_iter()
        .filter(|(k, _)| !PLACEMENT_KEYS.contains(&k.as_str()) && !owned.contains(&k.as_str()))
        .collect()
}

fn default_of(kind: DeviceKind, key: &str) -> Option<&'static str> {
    let served = kind.info().vhost_user.as_ref()?;
    served
        .defaults
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| *v)
}

fn subcommand(kind: DeviceKind) -> Command {
    let schema = kind.schema();
    let front = kind.info().vhost_user.as_ref().map_or("", |s| s.front_end);
    let mut c = Command::new(kind.key()).about(format!("{} ({front})", kind.doc()));
    c = c.arg(
        Arg::new("socket")
            .long("socket")
            .value_name("PATH")
            .required(true)
            .value_parser(clap::value_parser!(PathBuf))
            .help("vhost-user socket to listen on"),
    );
    let required: Vec<&str> = schema["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    for (key, prop) in options(kind, &schema) {
        let mut help = describe(&schema, prop);
        let mut a = Arg::new(key.clone()).long(key.replace('_', "-"));
        if is_type(&schema, prop, "boolean") {
            a = a.action(ArgAction::SetTrue);
        } else {
            let default = default_of(kind, &key);
            a = a
                .value_name(key.to_uppercase())
                .required(required.contains(&key.as_str()) && key != "name" && default.is_none());
            if let Some(d) = default {
                a = a.default_value(d);
            }
        }
        if key == "name" {
            help = format!("{help} Default: {}.", kind.key());
        }
        c = c.arg(a.help(help));
    }
    c
}

fn properties(schema: &Value) -> Vec<(String, &Value)> {
    schema["properties"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v))
        .collect()
}

/// `v`, or the definition its `$ref` (possibly inside `allOf`) points at.
fn resolve<'s>(schema: &'s Value, v: &'s Value) -> &'s Value {
    let r = v["$ref"]
        .as_str()
        .or_else(|| v["allOf"][0]["$ref"].as_str());
    match r.and_then(|r| r.strip_prefix('#')) {
        Some(ptr) => schema.pointer(ptr).unwrap_or(v),
        None => v,
    }
}

fn describe(schema: &Value, prop: &Value) -> String {
    prop["description"]
        .as_str()
        .or_else(|| resolve(schema, prop)["description"].as_str())
        .unwrap_or("")
        .replace('\n', " ")
}

fn is_type(schema: &Value, prop: &Value, ty: &str) -> bool {
    let t = &resolve(schema, prop)["type"];
    t.as_str() == Some(ty) || t.as_array().is_some_and(|a| a.iter().any(|x| x == ty))
}

/// Whether the key takes a table in some form (a `oneOf`/`anyOf` with an object).
fn takes_table(schema: &Value, prop: &Value) -> bool {
    let r = resolve(schema, prop);
    ["oneOf", "anyOf"].iter().any(|k| {
        r[*k].as_array().is_some_and(|alts| {
            alts.iter()
                .any(|a| is_type(schema, a, "object") || a["properties"].is_object())
        })
    })
}

/// The machine-file value of the device the options describe.
fn value_of(kind: DeviceKind, m: &ArgMatches) -> Result<Value, String> {
    let schema = kind.schema();
    let mut obj = Map::new();
    obj.insert("name".into(), Value::String(kind.key().into()));
    for (key, prop) in options(kind, &schema) {
        let opt = format!("--{}", key.replace('_', "-"));
        if is_type(&schema, prop, "boolean") {
            if m.get_flag(&key) {
                obj.insert(key, Value::Bool(true));
            }
            continue;
        }
        let Some(raw) = m.get_one::<String>(&key) else {
            continue;
        };
        if raw.is_empty() {
            return Err(format!("{opt}: the value is empty"));
        }
        let v = if is_type(&schema, prop, "integer") {
            raw.parse::<i64>()
                .map(Value::from)
                .map_err(|_| format!("{opt}: `{raw}` is not an integer"))?
        } else if let Some((sub, val)) = raw.split_once('=')
            && takes_table(&schema, prop)
        {
            if val.is_empty() {
                return Err(format!("{opt}: `{sub}=` needs a value after `=`"));
            }
            Value::Object(Map::from_iter([(sub.to_string(), Value::from(val))]))
        } else {
            Value::String(raw.clone())
        };
        obj.insert(key, v);
    }
    Ok(Value::Object(obj))
}

/// Checks the options of `vmm device <kind>`, opens the device and serves it until the front
/// end disconnects.
pub fn run(
    kind: DeviceKind,
    m: &ArgMatches,
    unsealed_ok: bool,
    seccomp: crate::sandbox::Mode,
) -> Result<(), Failed> {
    let bad = |message: String| Failed { code: 2, message };
    let value = value_of(kind, m).map_err(bad)?;
    // The schema first, as for a machine file: patterns, lengths and forms, all at once.
    let problems = crate::spec::schema::check_device(kind.key(), &value);
    if !problems.is_empty() {
        let lines: Vec<String> = problems
            .into_iter()
            .map(|(msg, help)| match help {
                Some(h) => format!("{msg} ({h})"),
                None => msg,
            })
            .collect();
        return Err(bad(lines.join("\n")));
    }
    let device = kind.parse(value).map_err(bad)?;
    let base = std::env::current_dir().map_err(|e| bad(format!("working directory: {e}")))?;
    let mut cx = crate::validate::ArgsCheck::new(&base);
    device.spec().check(&mut cx);
    let mut errors = Vec::new();
    for (error, line) in cx.into_problems() {
        if error {
            errors.push(line);
        } else {
            eprintln!("vmm device {}: warning: {line}", kind.key());
        }
    }
    if !errors.is_empty() {
        return Err(bad(errors.join("\n")));
    }
    let model = match device.device().served(&base) {
        Some(Ok(model)) => model,
        Some(Err(e)) => return Err(bad(e.to_string())),
        None => return Err(bad(format!("`{kind}` devices cannot be served"))),
    };
    let socket = m
        .get_one::<PathBuf>("socket")
        .ok_or_else(|| bad("--socket is required".into()))?;
    // The device's files are open: from here the process makes only the daemon's calls and
    // its kind's worker calls, in every thread the vhost-user crate starts.
    let mut calls = kind.info().seccomp.calls.to_vec();
    calls.extend_from_slice(crate::sandbox::WORKER_BASE);
    crate::sandbox::init_process(seccomp, &crate::sandbox::DAEMON, &calls).map_err(|e| Failed {
        code: 1,
        message: e.to_string(),
    })?;
    eprintln!(
        "vmm device {}: listening on {}",
        kind.key(),
        socket.display()
    );
    super::serve(kind.key(), model, socket, unsealed_ok).map_err(|e| Failed {
        code: 1,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Value, String> {
        let kind = DeviceKind::from_key(args[0]).unwrap();
        let m = subcommand(kind)
            .try_get_matches_from(args.iter().copied())
            .map_err(|e| e.to_string())?;
        value_of(kind, &m)
    }

    #[test]
    fn every_served_kind_gets_its_keys_as_options() {
        assert!(kinds().count() >= 4);
        for k in kinds() {
            let c = subcommand(k);
            let longs: Vec<&str> = c.get_arguments().filter_map(|a| a.get_long()).collect();
            assert!(longs.contains(&"socket"), "{k}: {longs:?}");
            assert!(longs.contains(&"name"), "{k}: {longs:?}");
            assert!(!longs.contains(&"slot"), "{k}: {longs:?}");
            for owned in k.info().vhost_user.as_ref().unwrap().front_end_keys {
                assert!(!longs.contains(owned), "{k}: {longs:?}");
            }
            for a in c.get_arguments() {
                assert!(
                    a.get_help().is_some(),
                    "{k} --{:?} has no help",
                    a.get_long()
                );
            }
        }
    }

    #[test]
    fn options_become_the_machine_file_value() {
        let v = parse(&["block", "--socket", "s", "--path", "d.img", "--readonly"]).unwrap();
        assert_eq!(v["path"], "d.img");
        assert_eq!(v["readonly"], true);
        assert_eq!(v["name"], "block");
        let v = parse(&["console", "--socket", "s", "--io", "file=out.log"]).unwrap();
        assert_eq!(v["io"]["file"], "out.log");
        let v = parse(&["console", "--socket", "s"]).unwrap();
        assert_eq!(v["io"], "stdio", "the served console's default");
        assert!(
            parse(&[
                "net",
                "--socket",
                "s",
                "--tap",
                "t0",
                "--mac",
                "02:00:00:00:00:01"
            ])
            .is_err()
        );
        assert!(parse(&["console", "--socket", "s", "--io", "file="]).is_err());
        assert!(parse(&["rng", "--socket", "s", "--rate", ""]).is_err());
        assert!(
            parse(&["block", "--socket", "s"]).is_err(),
            "--path is required"
        );
        assert!(parse(&["rng", "--socket", "s", "--slot", "3"]).is_err());
    }

    #[test]
    fn bad_values_name_the_option() {
        let kind = DeviceKind::from_key("console").unwrap();
        let v = parse(&["console", "--socket", "s", "--io", "tty"]).unwrap();
        let e = kind.parse(v).unwrap_err();
        assert!(e.starts_with("--io: "), "{e}");
        assert!(e.contains("tty"), "{e}");
    }
}
