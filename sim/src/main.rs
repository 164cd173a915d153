//! The `sim` command. Exit codes: 0 pass, 1 a violation was found (the
//! replay command is printed), 2 bad usage or bad input (one-line error).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use engine::fix::FixPolicy;
use sim::compare;
use sim::determinism::check_seed;
use sim::report::{self, SeedRange};
use sim::runner::{Outcome, RunSpec, run};
use sim::seedfile::{Expected, SeedFile};
use sim::sweep::{self, SweepSpec};

#[derive(Parser)]
#[command(
    name = "sim",
    version,
    about = "cowsim: deterministic simulation of a btrfs-faithful COW filesystem"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// With no subcommand, `sim` runs one seed.
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run one seed of a scenario.
    Run(RunArgs),
    /// Reproduce a saved run exactly and say whether it matched.
    Replay {
        file: PathBuf,
        #[arg(long)]
        json: bool,
        /// Print the full timeline (filter with RUST_LOG).
        #[arg(long)]
        trace: bool,
    },
    /// List scenarios and fixes.
    List,
    /// Run every seed twice and compare traces.
    CheckDeterminism {
        #[command(flatten)]
        seeds: SeedsArgs,
        /// random, pct, pct:DEPTH or pct:DEPTH:STEPS (default: the seed's configuration).
        #[arg(long)]
        scheduler: Option<String>,
    },
    /// Run the same seeds under each fix and print one table (exit 0 even with violations).
    Compare {
        #[arg(long)]
        scenario: String,
        /// Seeds as A..B (B excluded) or a single N.
        #[arg(long)]
        seeds: String,
        /// Comma-separated fix names (default: all, in `sim list` order).
        #[arg(long)]
        fixes: Option<String>,
        /// Worker threads; the output is the same for any number.
        #[arg(long, default_value_t = 2)]
        jobs: usize,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Run many seeds of one fix, appending one JSON line per seed to DIR/results.jsonl
    /// (exit 1 if any seed failed).
    Sweep {
        #[command(flatten)]
        seeds: SeedsArgs,
        /// Seeds run at once, each on a fresh thread.
        #[arg(long, default_value_t = 2)]
        jobs: usize,
        /// Run only shard K of N (K from 0): the seeds whose offset in the range is K mod N.
        #[arg(long, default_value = "0/1")]
        shard: String,
        /// Each seed draws its own world (scheduler, memory, reclaim, device).
        #[arg(long)]
        swarm: bool,
        /// Fraction of seeds run twice that must give the same trace.
        #[arg(long, default_value_t = 0.02)]
        canary: f64,
        /// Output directory: sweep.json, results.jsonl, seeds/.
        #[arg(long)]
        out: PathBuf,
        /// Go on with the sweep in --out, skipping the seeds it has finished.
        #[arg(long)]
        resume: bool,
        /// Print the summary as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Combine sweep directories (shards) into one summary. Exit 1 on any violation or, with
    /// --known, on a failure no known seed file has, a diverged canary, or missing seeds or shards.
    Merge {
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Seed files of known failures: only a failure whose fingerprint none has is new.
        #[arg(long)]
        known: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Reduce a failing seed file while it keeps failing the same way; writes FILE-shrunk.json.
    Shrink {
        file: PathBuf,
        /// Most candidate runs to try.
        #[arg(long, default_value_t = 200)]
        max_runs: u32,
        /// Where to write the shrunk seed file (default: beside FILE).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// A scenario, a range of seeds and one fix.
#[derive(Args)]
struct SeedsArgs {
    #[arg(long, default_value = scenarios::DEFAULT_SCENARIO)]
    scenario: String,
    /// Seeds as A..B (B excluded) or a single N.
    #[arg(long)]
    seeds: String,
    #[arg(long, default_value = "none")]
    fix: String,
}

#[derive(Args)]
struct RunArgs {
    #[arg(long, default_value = scenarios::DEFAULT_SCENARIO)]
    scenario: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "none")]
    fix: String,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    json: bool,
    /// Print the full timeline (filter with RUST_LOG).
    #[arg(long)]
    trace: bool,
    /// random, pct, pct:DEPTH or pct:DEPTH:STEPS (default: the seed's configuration).
    #[arg(long)]
    scheduler: Option<String>,
    /// Replay a workload file (one operation per line) with the `workload` scenario.
    #[arg(long, conflicts_with = "scenario")]
    workload: Option<PathBuf>,
    /// Node size for --workload, in bytes (4096 to 65536).
    #[arg(long, default_value_t = 16384, requires = "workload")]
    nodesize: u32,
    /// On a violation, write a seed file into this directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the run as a seed file to FILE, whatever its outcome (a fixed
    /// bug's seed records that it now passes).
    #[arg(long)]
    save: Option<PathBuf>,
    /// Draw the seed's own world, as `sim sweep --swarm` does.
    #[arg(long, conflicts_with = "workload")]
    swarm: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => run_one(cli.run),
        Some(Command::Run(args)) => run_one(args),
        Some(Command::Replay { file, json, trace }) => replay(file, json, trace),
        Some(Command::List) => {
            print!("{}", report::list());
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::CheckDeterminism { seeds, scheduler }) => {
            check_determinism(&seeds.scenario, &seeds.seeds, &seeds.fix, scheduler.as_deref())
        }
        Some(Command::Compare { scenario, seeds, fixes, jobs, json }) => {
            compare_fixes(scenario, &seeds, fixes.as_deref(), jobs, json)
        }
        Some(Command::Sweep {
            seeds: SeedsArgs { scenario, seeds, fix },
            jobs,
            shard,
            swarm,
            canary,
            out,
            resume,
            json,
        }) => {
            init_tracing(false);
            sim::pool::capture_panics();
            let spec = (|| {
                Ok::<_, String>(SweepSpec {
                    scenario,
                    seeds: seeds.parse()?,
                    fix: fix.parse()?,
                    jobs,
                    shard: shard.parse()?,
                    swarm,
                    canary,
                    out,
                    resume,
                })
            })();
            spec.and_then(|spec| run_sweep(&spec, json))
        }
        Some(Command::Merge { dirs, known, json }) => merge(&dirs, known.as_deref(), json),
        Some(Command::Shrink { file, max_runs, out }) => shrink(&file, max_runs, out),
    };
    result.unwrap_or_else(|message| {
        eprintln!("error: {message}");
        ExitCode::from(2)
    })
}

fn init_tracing(trace: bool) {
    let default = if trace { "cowsim::trace=debug,cowsim::violation=info" } else { "warn" };
    let filter = match std::env::var("RUST_LOG") {
        Ok(value) if !value.is_empty() => tracing_subscriber::EnvFilter::new(value),
        _ => tracing_subscriber::EnvFilter::new(default),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .without_time()
        .with_writer(std::io::stderr)
        .init();
}

fn run_one(args: RunArgs) -> Result<ExitCode, String> {
    init_tracing(args.trace);
    let scenario_name = if args.workload.is_some() { "workload" } else { args.scenario.as_str() };
    let scenario = scenarios::by_name(scenario_name)?;
    let fix: FixPolicy = args.fix.parse()?;
    let mut spec = RunSpec::new(scenario_name, args.seed, fix);
    spec.swarm = args.swarm;
    spec.scheduler = args.scheduler.as_deref().map(str::parse).transpose()?;
    if let Some(path) = &args.workload {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        scenarios::workload::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if !engine::format::check_nodesize(args.nodesize) {
            return Err(format!("bad --nodesize {}: a power of two from 4096 to 65536", args.nodesize));
        }
        spec.params = Some(scenarios::fs_workload::FsWorkload::params(&text, args.nodesize));
    }
    let result = run(&spec, &*scenario)?;
    if args.json {
        println!("{}", serde_json::to_string(&result).expect("result serializes"));
    } else {
        print!("{}", report::summary(&result));
    }
    if let Some(path) = &args.save {
        SeedFile::from_result(&result, false).save(path)?;
        eprintln!("seed file: {}", path.display());
    }
    if result.outcome == Outcome::Pass {
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(dir) = args.out {
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let path = dir.join(format!("{}-{}-{}.json", result.scenario, result.seed, result.fix));
        SeedFile::from_result(&result, false).save(&path)?;
        eprintln!("seed file: {}", path.display());
    }
    eprintln!("replay: {}", result.replay_command);
    Ok(ExitCode::from(1))
}

fn replay(file: PathBuf, json: bool, trace: bool) -> Result<ExitCode, String> {
    init_tracing(trace);
    let seed_file = SeedFile::load(&file)?;
    let scenario = scenarios::by_name(&seed_file.scenario)?;
    let mut result = run(&seed_file.spec(), &*scenario)?;
    // The file, not the seed alone, reproduces this run (its configuration may be shrunk).
    result.replay_command = format!("cargo run --release --bin sim -- replay {}", file.display());
    let got = Expected::of(&result);
    if json {
        println!("{}", serde_json::to_string(&result).expect("result serializes"));
    } else {
        print!("{}", report::summary(&result));
    }
    if got != seed_file.expected {
        eprintln!(
            "replay DIVERGED: expected {:?} with trace {} ({:?}), got {:?} with trace {} ({:?})",
            seed_file.expected.outcome,
            seed_file.expected.trace_hash,
            seed_file.expected.violation,
            got.outcome,
            got.trace_hash,
            got.violation
        );
        return Ok(ExitCode::from(1));
    }
    eprintln!("replay reproduced: same outcome, same trace hash {}", got.trace_hash);
    Ok(if got.outcome == Outcome::Pass { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn check_determinism(
    scenario_name: &str,
    seeds: &str,
    fix: &str,
    scheduler: Option<&str>,
) -> Result<ExitCode, String> {
    init_tracing(false);
    let scenario = scenarios::by_name(scenario_name)?;
    let fix: FixPolicy = fix.parse()?;
    let range: SeedRange = seeds.parse()?;
    let scheduler = scheduler.map(str::parse).transpose()?;
    for seed in range.iter() {
        let mut spec = RunSpec::new(scenario_name, seed, fix);
        spec.scheduler = scheduler;
        if let Some(divergence) = check_seed(&spec, &*scenario)? {
            println!("NONDETERMINISTIC: {divergence}");
            return Ok(ExitCode::from(1));
        }
    }
    println!(
        "deterministic: {} seeds of {scenario_name} ({fix}) each ran twice with identical traces",
        range.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn compare_fixes(
    scenario: String,
    seeds: &str,
    fixes: Option<&str>,
    jobs: usize,
    json: bool,
) -> Result<ExitCode, String> {
    init_tracing(false);
    sim::pool::capture_panics();
    let spec =
        compare::CompareSpec { scenario, seeds: seeds.parse()?, fixes: compare::parse_fixes(fixes)?, jobs };
    let comparison = compare::compare(&spec)?;
    if json {
        println!("{}", serde_json::to_string(&comparison).expect("comparison serializes"));
    } else {
        print!("{}", compare::table(&comparison));
    }
    eprint!("{}", compare::panics(&comparison));
    eprint!("{}", compare::wall_clock(&comparison));
    Ok(ExitCode::SUCCESS)
}

fn run_sweep(spec: &SweepSpec, json: bool) -> Result<ExitCode, String> {
    let outcome = sweep::sweep(spec, &mut sweep::StderrProgress::new())?;
    if json {
        println!("{}", serde_json::to_string(&outcome.summary).expect("a summary serializes"));
    } else {
        print!("{}", sweep::summary_text(&outcome.summary));
    }
    eprint!("{}", sweep::wall_clock(&outcome.lines, outcome.ran, Some(outcome.elapsed)));
    Ok(if outcome.summary.failing_seeds.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn merge(dirs: &[PathBuf], known: Option<&std::path::Path>, json: bool) -> Result<ExitCode, String> {
    let summary = sweep::merge(dirs)?;
    let known = known.map(sweep::known_fingerprints).transpose()?;
    if json {
        println!("{}", serde_json::to_string(&summary).expect("a summary serializes"));
    } else {
        print!("{}", sweep::summary_text(&summary));
    }
    let Some(known) = known else {
        return Ok(if summary.failing_seeds.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) });
    };
    let new: Vec<(&String, &Vec<u64>)> =
        summary.fingerprints.iter().filter(|(fingerprint, _)| !known.contains(*fingerprint)).collect();
    for (fingerprint, seeds) in &new {
        eprintln!("NEW failure: {fingerprint} (seeds {seeds:?})");
    }
    if !summary.canary_diverged.is_empty() {
        eprintln!("NONDETERMINISM: seeds {:?} gave two different traces", summary.canary_diverged);
    }
    if summary.seeds_missing > 0 || !summary.shards_missing.is_empty() {
        eprintln!(
            "INCOMPLETE: {} seeds without a result, shards missing: {:?}",
            summary.seeds_missing, summary.shards_missing
        );
    }
    let judged = new.is_empty()
        && summary.canary_diverged.is_empty()
        && summary.seeds_missing == 0
        && summary.shards_missing.is_empty();
    Ok(if judged { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn shrink(file: &std::path::Path, max_runs: u32, out: Option<PathBuf>) -> Result<ExitCode, String> {
    init_tracing(false);
    sim::pool::capture_panics();
    let seed_file = SeedFile::load(file)?;
    let out = out.unwrap_or_else(|| {
        let stem = file.file_stem().map_or("seed".into(), |s| s.to_string_lossy().into_owned());
        file.with_file_name(format!("{stem}-shrunk.json"))
    });
    let shrunk = sim::shrink::shrink(&seed_file, max_runs, |run, kept| {
        eprintln!("shrink: candidate {run}: {}", if kept { "same failure, kept" } else { "rejected" });
    })?;
    shrunk.file.save(&out)?;
    let (b, a) = (shrunk.before, shrunk.after);
    println!(
        "shrunk {} ({}): {} of {} candidate runs kept",
        file.display(),
        shrunk.fingerprint,
        shrunk.accepted,
        shrunk.runs
    );
    println!("  operations completed  {:>10} -> {}", b.ops_completed, a.ops_completed);
    println!("  reclaim events        {:>10} -> {}", b.reclaim_events, a.reclaim_events);
    println!("  scheduling decisions  {:>10} -> {}", b.decisions, a.decisions);
    println!("  trace events          {:>10} -> {}", b.trace_events, a.trace_events);
    println!("wrote {}; replay it with: sim replay {}", out.display(), out.display());
    Ok(ExitCode::SUCCESS)
}
