//! The plan checker: it accepts every plan the scheduler makes (every conformance script
//! and example, under several limits) and rejects corrupted ones; a run under a small
//! budget stays under it, measured by the process's own peak RSS.

mod common;

use std::path::Path;

use common::*;
use mergec::driver::Compiled;
use mergec::plan::{self, Draft, Limits};

fn limits_variants() -> Vec<Limits> {
    vec![
        Limits::default(),
        Limits {
            threads: 1,
            write_queue: 1,
            ..Limits::default()
        },
        Limits {
            stream_block_elems: 100,
            chunk_elems: 64,
            ..Limits::default()
        },
    ]
}

fn compile_dir(dir: &Path, base: &Path, out: &Path) -> Vec<(String, Compiled)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "merge"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            match compile_text(&text, base, out) {
                Ok((_, c)) => (name, c),
                Err((s, d)) => panic!("{name}: {}", render(&s, &d)),
            }
        })
        .collect()
}

fn all_scripts(tmp: &Path) -> Vec<(String, Compiled)> {
    let mut all = compile_dir(&repo().join("tests/conformance"), &conformance_dir(), tmp);
    let examples = demo_checkout(tmp);
    all.extend(compile_dir(&repo().join("examples"), &examples, &tmp.join("out")));
    all
}

#[test]
fn the_checker_accepts_every_plan_the_scheduler_makes() {
    let tmp = tempfile::tempdir().unwrap();
    let scripts = all_scripts(tmp.path());
    assert!(scripts.len() >= 30, "only {} scripts", scripts.len());
    for (name, c) in &scripts {
        for limits in limits_variants() {
            let draft = plan::draft(&c.graph, &c.program, &limits, false);
            if let Err(d) = plan::check(draft, &c.program) {
                panic!("{name}: {}", d.message);
            }
        }
    }
}

/// A plan with an input read by more than one step.
fn shared_input_plan(tmp: &Path) -> (Compiled, Draft) {
    let text = "model a = \"models/base\"\nsave a to \"out/one\"\nsave a * 0.5 to \"out/two\"\n";
    write_demo_models(tmp);
    let (_, c) =
        compile_text(text, tmp, &tmp.join("out")).unwrap_or_else(|(s, d)| panic!("{}", render(&s, &d)));
    let draft = plan::draft(&c.graph, &c.program, &Limits::default(), false);
    let plan = plan::check(draft, &c.program).unwrap();
    (c, plan.into_draft())
}

fn rejected(c: &Compiled, plan: &Draft, what: &str, expect: &str) {
    match plan::check(plan.clone(), &c.program) {
        Ok(_) => panic!("{what}: accepted"),
        Err(d) => assert!(d.message.contains(expect), "{what}: {}", d.message),
    }
}

#[test]
fn the_checker_rejects_corrupted_plans() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, plan) = shared_input_plan(tmp.path());
    assert!(plan.steps.len() >= 4);

    // a missing step
    let mut p = plan.clone();
    p.steps.remove(1);
    p.releases.remove(1);
    rejected(&c, &p, "missing step", "missing");

    // two steps of one output swapped: shards would not be written in order
    let mut p = plan.clone();
    p.steps.swap(0, 1);
    p.releases.swap(0, 1);
    rejected(&c, &p, "wrong order", "order");

    // the peak under-reported
    let mut p = plan.clone();
    p.peak_bytes -= 1;
    rejected(&c, &p, "peak", "peak");

    // an input released at its first use although a later step reads it again
    let mut p = plan.clone();
    let (first, slot) = (0..p.steps.len())
        .find_map(|i| {
            p.steps[i].inputs.iter().enumerate().find_map(|(j, x)| {
                let later = p.steps[i + 1..].iter().any(|s| {
                    s.inputs
                        .iter()
                        .any(|y| y.model == x.model && y.tensor == x.tensor)
                });
                later.then_some((i, j))
            })
        })
        .expect("an input read twice");
    p.releases[first].push(slot);
    rejected(&c, &p, "freed too early", "released");

    // an input never released
    let mut p = plan.clone();
    let i = p.releases.iter().position(|r| !r.is_empty()).unwrap();
    p.releases[i].clear();
    rejected(&c, &p, "never freed", "never released");

    // a release of an input the step does not have
    let mut p = plan.clone();
    p.releases[0].push(99);
    rejected(&c, &p, "bad release", "releases");
}

/// Writes a bf16 model of about 100 MB.
fn write_model(dir: &Path, variant: u32) {
    let spec = mergec::synth::SynthSpec {
        vocab: 16000,
        hidden: 768,
        intermediate: 2048,
        layers: 4,
        heads: 12,
        kv_heads: 12,
        dtype: mergec::io::DType::BF16,
        seed: 5,
        variant,
        tie_embeddings: false,
    };
    mergec::synth::write_model(&spec, dir, true).unwrap();
}

/// Runs `mergec ARGS` and returns its exit status and its own peak RSS: the high-water
/// mark of its address space (`VmHWM`), sampled until it exits. (`wait4`'s `ru_maxrss`
/// would also count this test process's memory, which a spawned child shares until its
/// exec, and other tests run in this process at the same time.)
#[cfg(target_os = "linux")]
fn run_measured(args: &[&str], cwd: &Path) -> (bool, u64, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mergec"))
        .args(args)
        .current_dir(cwd)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr_pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut s = String::new();
        let _ = stderr_pipe.read_to_string(&mut s);
        s
    });
    let status_file = format!("/proc/{}/status", child.id());
    let exe = std::fs::canonicalize(env!("CARGO_BIN_EXE_mergec")).unwrap();
    let mut hwm = 0u64;
    let status = loop {
        // only once the child runs mergec's image (before its exec it is this process)
        let execed = std::fs::read_link(format!("/proc/{}/exe", child.id())).is_ok_and(|e| e == exe);
        if let (true, Ok(text)) = (execed, std::fs::read_to_string(&status_file)) {
            if let Some(kb) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                hwm = hwm.max(kb * 1024);
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    (status.success(), hwm, reader.join().unwrap())
}

#[cfg(target_os = "linux")]
#[test]
fn a_run_under_a_small_budget_stays_under_it() {
    let tmp = tempfile::tempdir().unwrap();
    write_model(&tmp.path().join("a"), 1);
    write_model(&tmp.path().join("b"), 2);
    let script =
        "model a = \"a\"\nmodel b = \"b\"\nsave linear(a { weight: 0.6 }, b { weight: 0.4 }) to \"out\"\n";
    std::fs::write(tmp.path().join("m.merge"), script).unwrap();
    let budget: u64 = 64 << 20;
    let (ok, rss, stderr) = run_measured(
        &[
            "run",
            "m.merge",
            "--backend",
            "cpu",
            "--max-memory",
            "64MiB",
            "--threads",
            "2",
        ],
        tmp.path(),
    );
    assert!(ok, "{stderr}");
    assert!(rss > 0, "no sample of the run's memory");
    let inputs: u64 = ["a", "b"]
        .iter()
        .map(|m| {
            std::fs::metadata(tmp.path().join(m).join("model.safetensors"))
                .unwrap()
                .len()
        })
        .sum();
    assert!(
        inputs > 3 * budget,
        "inputs of {inputs} bytes do not test the budget"
    );
    // the process's own peak RSS: the budget plus code, stacks and the allocator's slack
    assert!(
        rss < budget + (64 << 20),
        "peak RSS {} MiB over the budget of {} MiB + 64 MiB",
        rss >> 20,
        budget >> 20
    );
    // and a budget below the plan's smallest is refused before anything runs
    std::fs::write(tmp.path().join("c.merge"), script.replace("\"out\"", "\"out2\"")).unwrap();
    let (ok, _, stderr) = run_measured(&["check", "c.merge", "--max-memory", "1MiB"], tmp.path());
    assert!(!ok && stderr.contains("E0501"), "{stderr}");
}

/// Whole-tensor methods under a budget of exactly the plan's peak (as `mergec plan`
/// prints it, rounded up to a MiB) run and stay under it: the plan's accounting of each
/// method's working memory is an upper bound, not a guess. The methods are those with the
/// most working memory: TIES (sampled and collected keys), arcee_fusion (keys) and
/// breadcrumbs (keys and bitsets).
#[cfg(target_os = "linux")]
#[test]
fn whole_tensor_methods_stay_under_the_plans_peak() {
    let tmp = tempfile::tempdir().unwrap();
    write_model(&tmp.path().join("base"), 0);
    write_model(&tmp.path().join("a"), 1);
    write_model(&tmp.path().join("b"), 2);
    let models = "model base = \"base\"\nmodel a = \"a\"\nmodel b = \"b\"\n";
    for (name, call) in [
        (
            "ties",
            "ties(base, a { weight: 0.6, density: 0.3 }, b { weight: 0.4, density: 0.5 })",
        ),
        ("arcee", "arcee_fusion(base, a)"),
        (
            "breadcrumbs",
            "breadcrumbs(base, a { weight: 0.5, density: 0.5 }, b { weight: 0.5, density: 0.7 })",
        ),
    ] {
        let file = format!("{name}.merge");
        std::fs::write(
            tmp.path().join(&file),
            format!("{models}save {call} to \"out-{name}\"\n"),
        )
        .unwrap();
        let plan = std::process::Command::new(env!("CARGO_BIN_EXE_mergec"))
            .args(["plan", &file])
            .current_dir(tmp.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&plan.stdout);
        let peak: u64 = stdout
            .rsplit_once("peak ")
            .and_then(|(_, p)| p.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{name}: no peak in {stdout}"));
        let budget_mib = peak.div_ceil(1 << 20);
        let (ok, rss, stderr) = run_measured(
            &[
                "run",
                &file,
                "--backend",
                "cpu",
                "--max-memory",
                &format!("{budget_mib}MiB"),
                "--threads",
                "2",
            ],
            tmp.path(),
        );
        assert!(ok, "{name}: {stderr}");
        assert!(rss > 0, "{name}: no sample of the run's memory");
        eprintln!(
            "{name}: plan peak {} MiB, run peak RSS {} MiB",
            peak >> 20,
            rss >> 20
        );
        assert!(
            rss < (budget_mib << 20) + (64 << 20),
            "{name}: peak RSS {} MiB over the plan's {budget_mib} MiB + 64 MiB",
            rss >> 20
        );
    }
}

/// A MoE output's router job is part of the plan's peak: a gate that runs the base model
/// over the prompts costs more than random vectors, and longer prompts cost more still.
#[test]
fn router_jobs_are_charged() {
    let tmp = tempfile::tempdir().unwrap();
    write_demo_models(tmp.path());
    let peak = |gate: &str, prompt: &str| {
        let text = format!(
            "model base = \"models/base\"\nmodel chat = \"models/chat\"\nmodel math = \"models/math\"\n\
             save moe(base, chat {{ positive: [\"{prompt}\"] }}, math {{ positive: [\"what is 12 * 7?\"] }}, \
             gate: \"{gate}\", allow_same_experts: true) to \"out/moe\"\n"
        );
        let (_, c) = compile_text(&text, tmp.path(), &tmp.path().join("out"))
            .unwrap_or_else(|(s, d)| panic!("{}", render(&s, &d)));
        c.plan.peak_bytes
    };
    let random = peak("random", "hello");
    let hidden = peak("hidden", "hello");
    // 1800 bytes: under the 2048-token prompt limit (E0410) whatever the tokenizer does.
    let long = peak("hidden", &"hello there ".repeat(150));
    assert!(hidden > random, "hidden {hidden}, random {random}");
    // 1800 more bytes of prompt: at least 1800 more tokens' hidden states (32 floats each)
    assert!(long >= hidden + 1800 * 32 * 4, "long {long}, hidden {hidden}");
}

/// A script with many saves holds its text once: every output's model card (and the
/// imported YAML) shares the one copy, so the plan does not grow with saves × script size.
#[test]
fn model_cards_share_the_script_text() {
    let tmp = tempfile::tempdir().unwrap();
    let models = conformance_dir().join("models");
    let mut text = format!(
        "model a = \"{}\"\nmodel b = \"{}\"\n# {}\n",
        models.join("micro-llama-ft1-f32").display(),
        models.join("micro-llama-ft2-f32").display(),
        "x".repeat(100_000)
    );
    for i in 0..50 {
        text.push_str(&format!(
            "save linear(a {{ weight: 1 }}, b {{ weight: {i} }}) to \"out/o{i}\"\n"
        ));
    }
    let (_, compiled) =
        compile_text(&text, &repo(), tmp.path()).unwrap_or_else(|(s, d)| panic!("{}", render(&s, &d)));
    let cards: Vec<_> = compiled
        .plan
        .outputs
        .iter()
        .map(|o| {
            let (_, card) = o
                .spec
                .generated_files
                .iter()
                .find(|(n, _)| n == "README.md")
                .unwrap();
            card.clone()
        })
        .collect();
    assert_eq!(cards.len(), 50);
    let script = |card: &mergec::io::writer::Contents| {
        card.parts()
            .iter()
            .find(|p| p.len() > 100_000)
            .cloned()
            .expect("the script is a part of its own")
    };
    let first = script(&cards[0]);
    for card in &cards {
        assert!(std::sync::Arc::ptr_eq(&script(card), &first));
        // The rest of each card is small.
        assert!(card.len() - (first.len() as u64) < 4096, "{}", card.len());
        let whole = String::from_utf8(card.to_vec()).unwrap();
        assert!(whole.contains("## Script") && whole.ends_with("\n```\n"));
    }
}
