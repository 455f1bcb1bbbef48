//! `bellows`: fine-tune Llama-family models from a TOML job file, on one process or many.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use bellows_trainer::{train, RunConfig};

mod adapter_args;
mod bench_cmd;
mod combine_cmd;
mod env_cmd;
mod eval_cmd;
mod export_cmd;
mod generate_cmd;
mod gpu_check_cmd;
mod launch_cmd;
mod merge_cmd;
mod quantize_arg;

/// Distributed fine-tuning of Llama-family models (full, LoRA) on CPU or CUDA.
#[derive(Debug, Parser)]
#[command(name = "bellows", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// A job file plus `--set` overrides.
#[derive(Debug, Args)]
struct JobArgs {
    /// The job file (TOML).
    config: PathBuf,
    /// Override a key: `--set dotted.key=value` (value read as TOML, else as a string). Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train as the job file says.
    Train(JobArgs),
    /// Check or show a job file.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Print version, backend, devices and threads.
    Env,
    /// Evaluate a Hugging Face model folder on a token file (Hugging Face causal-LM loss).
    Eval(eval_cmd::EvalArgs),
    /// Continue a prompt with a model folder (KV cache; greedy at temperature 0).
    Generate(generate_cmd::GenerateArgs),
    /// Time training steps on the shapes of the PyTorch + PEFT peer script (one JSON line).
    Bench(bench_cmd::BenchArgs),
    /// Run `train` in N processes per node (data parallel), torchrun-style.
    Launch(launch_cmd::LaunchArgs),
    /// Fold a PEFT adapter into its base model and write a plain Hugging Face folder.
    Merge(merge_cmd::MergeArgs),
    /// Write a checkpoint (sharded or not, any number of ranks) as a Hugging Face model / PEFT adapter folder.
    Export(export_cmd::ExportArgs),
    /// Combine PEFT adapters with weights into a new adapter (PEFT's `add_weighted_adapter`, linear).
    CombineAdapters(combine_cmd::CombineArgs),
    /// Dry run: per-rank memory and communication per step of DDP, ZeRO-1/2 and FSDP for a job, before anything is allocated.
    Plan(PlanArgs),
    /// Check a GPU host: golden parity on the device, matmul peak, CPU-vs-GPU loss curves, NCCL, a LoRA benchmark.
    GpuCheck(gpu_check_cmd::GpuCheckArgs),
}

/// `bellows plan`'s arguments.
#[derive(Debug, Args)]
struct PlanArgs {
    #[command(flatten)]
    job: JobArgs,
    /// Processes (ranks) to plan for, in all.
    #[arg(long, default_value_t = 1)]
    nproc: usize,
    /// Nodes the processes are spread over (for `hybrid`, which shards within a node).
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum ConfigCmd {
    /// Exit 0 if the job file is valid, 2 otherwise, printing every problem as `<file>: <key>: <message>`.
    Check(JobArgs),
    /// Print the resolved job file with every default filled in.
    Show(JobArgs),
}

fn load(job: &JobArgs) -> Result<RunConfig, ExitCode> {
    RunConfig::load(&job.config, &job.set).map_err(|issues| {
        eprintln!("{issues}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    bellows_trainer::keep_freed_memory();
    let cli = Cli::parse();
    match cli.command {
        Command::Config(ConfigCmd::Check(job)) => match load(&job) {
            Ok(_) => {
                println!("{}: ok", job.config.display());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Config(ConfigCmd::Show(job)) => match load(&job) {
            Ok(cfg) => {
                print!("{}", cfg.to_toml());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Plan(a) => {
            let cfg = match load(&a.job) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let planned = bellows_trainer::plan::job_arch(&cfg)
                .and_then(|arch| bellows_trainer::plan::plan(&cfg, &arch, a.nproc, a.nnodes));
            match planned {
                Ok(p) if a.json => {
                    println!("{}", serde_json::to_string(&p).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Ok(p) => {
                    print!("{}", bellows_trainer::plan::render(&p));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Launch(a) => launch_cmd::launch(a),
        Command::Bench(a) => bench_cmd::bench(a),
        Command::GpuCheck(a) => gpu_check_cmd::run(a),
        Command::Eval(a) => eval_cmd::eval(a),
        Command::Generate(a) => generate_cmd::run(a),
        Command::Env => {
            env_cmd::print();
            ExitCode::SUCCESS
        }
        Command::Merge(args) => merge_cmd::run(&args),
        Command::Export(args) => export_cmd::run(&args),
        Command::CombineAdapters(args) => combine_cmd::run(&args),
        Command::Train(job) => {
            let cfg = match load(&job) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match train(&cfg) {
                Ok(r) => {
                    let eval = r
                        .eval_loss
                        .map(|e| format!(", eval loss {e:.4}"))
                        .unwrap_or_default();
                    eprintln!(
                        "done: {} steps, loss {:.4} -> {:.4}{eval}; peak RSS {:.0} MiB; outputs in {}",
                        r.steps,
                        r.first_loss,
                        r.final_loss,
                        bellows_trainer::peak_rss_mib(),
                        cfg.run.output_dir.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
