//! Progress display: an indicatif bar on a terminal, plain log lines otherwise.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle as BarStyle};

use crate::config::ProgressStyle;
use crate::metrics::StepMetrics;

/// Shows training progress (only on the main process).
#[derive(Debug)]
pub enum Progress {
    /// A bar with step, loss, tok/s and ETA.
    Bar(ProgressBar),
    /// One line per logged step on stderr.
    Plain {
        /// Total steps.
        total: u64,
    },
    /// Nothing.
    Quiet,
}

impl Progress {
    /// Chooses the display for `style`, `total` steps, starting after `done` steps.
    pub fn new(style: ProgressStyle, total: u64, done: u64, main: bool) -> Self {
        let tty = std::io::stderr().is_terminal();
        match style {
            _ if !main => Progress::Quiet,
            ProgressStyle::Quiet => Progress::Quiet,
            ProgressStyle::Plain => Progress::Plain { total },
            ProgressStyle::Auto if !tty => Progress::Plain { total },
            ProgressStyle::Auto | ProgressStyle::Bar => {
                let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
                let style = BarStyle::with_template(
                    "{bar:30} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
                )
                .unwrap_or_else(|_| BarStyle::default_bar());
                bar.set_style(style);
                bar.set_position(done);
                Progress::Bar(bar)
            }
        }
    }

    /// Advances to `step` (called every step).
    pub fn step(&self, step: u64) {
        if let Progress::Bar(b) = self {
            b.set_position(step);
        }
    }

    /// Shows a logged step.
    pub fn log(&self, m: &StepMetrics) {
        let eval = m
            .eval_loss
            .map(|e| format!(" eval_loss {e:.4}"))
            .unwrap_or_default();
        match self {
            Progress::Bar(b) => {
                b.set_position(m.step);
                b.set_message(format!(
                    "loss {:.4}{eval} lr {:.2e} {:.0} tok/s",
                    m.loss, m.lr, m.tokens_per_sec
                ));
            }
            Progress::Plain { total } => eprintln!(
                "step {}/{} loss {:.4}{eval} lr {:.3e} grad_norm {:.3} tok/s {:.0}",
                m.step, total, m.loss, m.lr, m.grad_norm, m.tokens_per_sec
            ),
            Progress::Quiet => {}
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Progress::Bar(b) = self {
            b.finish();
        }
    }
}
