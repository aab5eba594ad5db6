//! The configuration's one table (`config::reference`) is the truth about
//! every variable: what each binary reads (its `envconfig` fields), the
//! defaults it applies, what `--help` prints, what the start-up log shows,
//! and `docs/configuration.md`. Any of them drifting fails here.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use telemetry_node::config::reference::{self, Binary, UNSET, VARIABLES};

/// (variable, default or `unset`) of every `envconfig` field in `files` of
/// src/config, read from the source as the compiler does.
fn read_in(files: &[&str]) -> BTreeMap<String, String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/config");
    let mut read = BTreeMap::new();
    for file in files {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        for (_, rest) in text.match_indices("envconfig(from = \"").map(|(i, _)| text.split_at(i + 18)) {
            let name = rest.split('"').next().unwrap().to_owned();
            let attribute = rest.split(")]").next().unwrap();
            let default = attribute.split_once("default = \"").map_or(UNSET, |(_, d)| d.split('"').next().unwrap());
            read.insert(name, default.to_owned());
        }
    }
    read
}

fn table(binary: Binary) -> BTreeMap<String, String> {
    reference::read_by(binary).map(|(variable, default)| (variable.name.to_owned(), default.to_owned())).collect()
}

#[test]
fn every_variable_read_is_in_the_table_with_its_default_and_none_else() {
    let node = read_in(&["node.rs", "remote_write.rs"]);
    let sink = read_in(&["sink.rs", "remote_write.rs"]);
    assert!(node.len() > 40 && sink.len() > 25, "{node:?} {sink:?}");
    assert_eq!(table(Binary::Node), node, "telemetry-node: the table vs the variables it reads");
    assert_eq!(table(Binary::Sink), sink, "telemetry-sink: the table vs the variables it reads");
    let mut names: Vec<&str> = VARIABLES.iter().map(|variable| variable.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), VARIABLES.len(), "a variable is in the table twice");
}

#[test]
fn the_tables_secrets_are_the_configurations_secret_fields() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/config");
    let mut secrets = Vec::new();
    for file in ["node.rs", "sink.rs", "remote_write.rs"] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let mut variable = None;
        for line in text.lines() {
            if let Some((_, rest)) = line.split_once("envconfig(from = \"") {
                variable = rest.split('"').next().map(str::to_owned);
            } else if line.trim_start().starts_with("pub ") && line.contains(':') {
                if line.contains("Secret>") || line.ends_with(": Secret,") {
                    secrets.extend(variable.take());
                }
                variable = None;
            }
        }
    }
    secrets.sort();
    secrets.dedup();
    let mut table: Vec<String> =
        VARIABLES.iter().filter(|variable| variable.secret).map(|variable| variable.name.to_owned()).collect();
    table.sort();
    assert_eq!(table, secrets);
}

#[test]
fn docs_configuration_md_holds_the_table() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md");
    let page = std::fs::read_to_string(&path).unwrap();
    let (start, end) = ("<!-- reference:", "<!-- end of reference -->");
    let begin = page.find(start).expect("the page marks where the reference goes");
    let begin = begin + page[begin..].find('\n').unwrap() + 1;
    let finish = page.find(end).expect("the page marks where the reference ends");
    let generated = reference::markdown();
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(&path, format!("{}{generated}{}", &page[..begin], &page[finish..])).unwrap();
        return;
    }
    assert_eq!(
        &page[begin..finish],
        generated,
        "docs/configuration.md differs from src/config/reference.rs: run UPDATE_DOCS=1 cargo test --test reference"
    );
}

#[test]
fn help_and_the_start_up_log_show_every_variable_secrets_hidden() {
    for (binary, program, arg) in [
        (Binary::Node, env!("CARGO_BIN_EXE_telemetry-node"), "help"),
        (Binary::Sink, env!("CARGO_BIN_EXE_telemetry-sink"), "--help"),
    ] {
        let output = std::process::Command::new(program).arg(arg).output().unwrap();
        assert!(output.status.success());
        let help = String::from_utf8(output.stdout).unwrap();
        let mut vars = HashMap::new();
        for (variable, _) in reference::read_by(binary) {
            assert!(help.contains(&format!("  {} ", variable.name)), "{program} --help lacks {}", variable.name);
            vars.insert(variable.name.to_owned(), format!("value-of-{}", variable.name));
        }
        let logged = reference::in_force(binary, &vars);
        for (variable, _) in reference::read_by(binary) {
            assert!(logged.contains(&format!("{}=", variable.name)), "{} is not logged", variable.name);
            let shown = logged.contains(&format!("value-of-{}", variable.name));
            assert_eq!(shown, !variable.secret, "{}: {logged}", variable.name);
        }
    }
}

#[test]
fn every_value_dot_env_example_sets_is_the_default_of_each_binary_that_reads_it() {
    // The file says every value in it is the default: a sink started with
    // the copied file must listen where its own default says.
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(".env.example")).unwrap();
    let mut set = 0;
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let Some((name, value)) = line.split_once('=') else { continue };
        let variable = VARIABLES.iter().find(|variable| variable.name == name);
        let variable = variable.unwrap_or_else(|| panic!(".env.example sets {name}, which no binary reads"));
        for default in [variable.node, variable.sink].into_iter().flatten() {
            assert_eq!(value, default, ".env.example: {name}={value}, but a binary's default is {default}");
        }
        set += 1;
    }
    assert!(set > 30, "{set}");
}

mod common;

#[test]
fn a_log_written_to_a_file_has_no_colour_codes_and_shows_the_configuration_in_force() {
    let dir = common::scratch("log-to-file");
    let env = [("GRPC_SERVER_SOCKET", "127.0.0.1:0".to_owned()), ("SINK_AUTH_TOKEN", "marker-secret".to_owned())];
    let (sink, _) = common::Process::start_sink("sink", &env, &dir);
    let (code, _, log) = sink.terminate(std::time::Duration::from_secs(30));
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("Configuration in force.") && log.contains("MAX_CONNECTIONS=1024"), "{log}");
    assert!(log.contains("SINK_AUTH_TOKEN=(set, not shown)") && !log.contains("marker-secret"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a log file: {log:?}");
}
