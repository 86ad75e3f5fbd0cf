//! Progress of long work (speech synthesis, training) on stderr: a bar
//! redrawn in place on a terminal, a line every 10 % otherwise (systemd's
//! journal, CI logs), so both stay readable.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// One bar: `label [=====>    ] done/total rate ETA detail`.
pub struct Bar {
    label: String,
    total: u64,
    done: u64,
    started: Instant,
    last_draw: Option<Instant>,
    /// Tenths already printed (non-terminal output).
    tenths: u64,
    tty: bool,
    detail: String,
}

impl Bar {
    pub fn new(label: &str, total: u64) -> Bar {
        let bar = Bar {
            label: label.to_string(),
            total: total.max(1),
            done: 0,
            started: Instant::now(),
            last_draw: None,
            tenths: 0,
            tty: std::io::stderr().is_terminal(),
            detail: String::new(),
        };
        if !bar.tty {
            eprintln!("{}: 0/{}", bar.label, bar.total);
        }
        bar
    }

    /// Sets the count done and a short detail ("loss 0.21").
    pub fn set(&mut self, done: u64, detail: &str) {
        self.done = done.min(self.total);
        detail.clone_into(&mut self.detail);
        if self.tty {
            let due = self
                .last_draw
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(100));
            if due || self.done == self.total {
                self.draw();
            }
        } else {
            let tenths = self.done * 10 / self.total;
            if tenths > self.tenths {
                self.tenths = tenths;
                eprintln!("{}", self.line());
            }
        }
    }

    fn line(&self) -> String {
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = self.done as f64 / elapsed.max(1e-3);
        let eta = if self.done > 0 {
            (self.total - self.done) as f64 / rate
        } else {
            0.0
        };
        format!(
            "{}: {}/{} ({:.0}%) {:.0}s elapsed, ~{:.0}s left {}",
            self.label,
            self.done,
            self.total,
            100.0 * self.done as f64 / self.total as f64,
            elapsed,
            eta,
            self.detail
        )
    }

    fn draw(&mut self) {
        self.last_draw = Some(Instant::now());
        const WIDTH: u64 = 30;
        let filled = (self.done * WIDTH / self.total) as usize;
        let bar = format!(
            "{}{}",
            "=".repeat(filled),
            " ".repeat(WIDTH as usize - filled)
        );
        let elapsed = self.started.elapsed().as_secs_f64();
        let eta = if self.done > 0 {
            (self.total - self.done) as f64 * elapsed / self.done as f64
        } else {
            0.0
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[2K{} [{bar}] {}/{} {:.0}s, ~{:.0}s left {}",
            self.label, self.done, self.total, elapsed, eta, self.detail
        );
        let _ = err.flush();
    }

    /// Ends the bar with a summary line.
    pub fn finish(&mut self, summary: &str) {
        let elapsed = self.started.elapsed().as_secs_f64();
        if self.tty {
            eprint!("\r\x1b[2K");
        }
        eprintln!("{}: {summary} ({elapsed:.1}s)", self.label);
    }

    /// Seconds since the bar started.
    pub fn elapsed_secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}
