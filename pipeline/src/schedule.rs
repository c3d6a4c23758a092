//! `pai-train schedule`: the built-in scheduler. It runs in the foreground, sleeps until the next time
//! the `[schedule] cron` expression names (local time), starts the nightly run, logs how it ended, and
//! remembers the last time it fired in `runs/schedule.json`. Sleeping in short steps, it notices when
//! the machine was suspended past a run; with `catch_up` it then runs once on waking (once, however
//! many runs were missed), and the same on start after a shutdown. For the system's own scheduler it
//! prints a crontab line or a systemd user service instead.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Local};
use serde::{Deserialize, Serialize};

use crate::error::{PipelineError, Result};

/// A parsed `[schedule] cron`.
#[derive(Debug, Clone)]
pub struct Schedule {
    expr: String,
    cron: cron::Schedule,
}

impl Schedule {
    pub fn parse(expr: &str) -> Result<Self> {
        let cron = crate::config::parse_cron(expr).map_err(|allowed| PipelineError::Invalid {
            key: "schedule.cron".into(),
            value: format!("{expr:?}"),
            allowed,
            origin: "the configuration".into(),
        })?;
        Ok(Self {
            expr: expr.to_string(),
            cron,
        })
    }

    /// The first time after `t`.
    pub fn next_after(&self, t: DateTime<Local>) -> Option<DateTime<Local>> {
        self.cron.after(&t).next()
    }

    /// The latest time in `(since, now]`: a run that should have happened and did not.
    pub fn missed(&self, since: DateTime<Local>, now: DateTime<Local>) -> Option<DateTime<Local>> {
        let mut last = None;
        for t in self.cron.after(&since) {
            if t > now {
                break;
            }
            last = Some(t);
        }
        last
    }

    /// The entry for crontab(5): the five fields (seconds dropped), then the command.
    pub fn crontab_line(&self, exe: &Path, home: &Path) -> String {
        let fields: Vec<&str> = self.expr.split_whitespace().collect();
        let five = if fields.len() >= 6 {
            fields[1..6].join(" ")
        } else {
            fields.join(" ")
        };
        format!(
            "{five} PAI_HOME={} {} nightly >> {} 2>&1",
            shell_quote(&home.display().to_string()),
            shell_quote(&exe.display().to_string()),
            shell_quote(&home.join("runs").join("nightly.log").display().to_string())
        )
    }

    /// A systemd user service that keeps this scheduler running (`~/.config/systemd/user/`).
    pub fn systemd_service(&self, exe: &Path, home: &Path) -> String {
        format!(
            "# ~/.config/systemd/user/pai-schedule.service\n\
             # enable with: systemctl --user daemon-reload && systemctl --user enable --now pai-schedule\n\
             [Unit]\n\
             Description=pai nightly fine-tuning scheduler ({expr})\n\
             \n\
             [Service]\n\
             Type=simple\n\
             Environment=PAI_HOME={home}\n\
             ExecStart={exe} schedule\n\
             Restart=on-failure\n\
             RestartSec=60\n\
             Nice=10\n\
             \n\
             [Install]\n\
             WantedBy=default.target\n",
            expr = self.expr,
            home = home.display(),
            exe = exe.display(),
        )
    }
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-=:".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// `runs/schedule.json`: what the scheduler remembers across restarts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScheduleState {
    /// The scheduled time of the last run started.
    pub last_fire: Option<DateTime<Local>>,
    /// When the scheduler last started (what a first catch-up counts from).
    pub started: Option<DateTime<Local>>,
    /// The last run's exit code.
    pub last_exit: Option<i32>,
}

impl ScheduleState {
    pub fn path(runs_dir: &Path) -> PathBuf {
        runs_dir.join("schedule.json")
    }

    pub fn read(runs_dir: &Path) -> ScheduleState {
        std::fs::read(Self::path(runs_dir))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn write(&self, runs_dir: &Path) -> Result<()> {
        std::fs::create_dir_all(runs_dir).map_err(|e| PipelineError::io("create", runs_dir, e))?;
        let bytes = serde_json::to_vec_pretty(self).map_err(|source| PipelineError::State {
            path: Self::path(runs_dir),
            source,
        })?;
        crate::nightly::write_atomic(&Self::path(runs_dir), &bytes)
    }
}

/// The time, and waiting for it (a fake one in tests).
pub trait Clock {
    fn now(&self) -> DateTime<Local>;
    fn sleep(&self, d: Duration);
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Local> {
        Local::now()
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// The longest single sleep: a suspend is noticed at most this long after waking.
const STEP: Duration = Duration::from_secs(30);

/// Run `night` at every scheduled time until `keep_going` says stop (checked between sleeps);
/// `night` returns the run's exit code. `log` hears each start and end.
pub fn run_scheduler(
    schedule: &Schedule,
    runs_dir: &Path,
    catch_up: bool,
    clock: &dyn Clock,
    mut keep_going: impl FnMut() -> bool,
    mut night: impl FnMut(DateTime<Local>) -> i32,
    mut log: impl FnMut(&str),
) -> Result<()> {
    let mut state = ScheduleState::read(runs_dir);
    let now = clock.now();
    // A run missed while the scheduler was not running (shut down, or never started since the last).
    let since = state.last_fire.or(state.started);
    state.started = Some(now);
    state.write(runs_dir)?;
    if catch_up {
        if let Some(missed) = since.and_then(|s| schedule.missed(s, now)) {
            fire(
                missed,
                "to catch up",
                &mut state,
                runs_dir,
                &mut night,
                &mut log,
            )?;
        }
    }
    loop {
        let from = clock.now();
        let Some(next) = schedule.next_after(from) else {
            log("the cron expression names no future time: stopping");
            return Ok(());
        };
        log(&format!("next run at {next}"));
        // Sleep in steps, so that a suspend past `next` is noticed soon after waking.
        loop {
            if !keep_going() {
                return Ok(());
            }
            let now = clock.now();
            if now >= next {
                break;
            }
            let left = (next - now).to_std().unwrap_or(Duration::ZERO);
            clock.sleep(left.min(STEP));
        }
        let now = clock.now();
        // Woken well past its time (a suspend): the missed run once, if catching up; else skip to the
        // next time.
        let late = (now - next).to_std().unwrap_or(Duration::ZERO) > 2 * STEP;
        if late && !catch_up {
            log(&format!(
                "missed the run at {next} (asleep); waiting for the next"
            ));
            continue;
        }
        let latest = schedule.missed(next, now).unwrap_or(next);
        let why = if late { "after a sleep" } else { "on schedule" };
        fire(latest, why, &mut state, runs_dir, &mut night, &mut log)?;
    }
}

/// Start the run scheduled for `at`, remembering it before (so a crash in it is not retried in a
/// loop) and its exit code after.
fn fire(
    at: DateTime<Local>,
    why: &str,
    state: &mut ScheduleState,
    runs_dir: &Path,
    night: &mut impl FnMut(DateTime<Local>) -> i32,
    log: &mut impl FnMut(&str),
) -> Result<()> {
    log(&format!("starting the nightly run {why} (scheduled {at})"));
    state.last_fire = Some(at);
    state.write(runs_dir)?;
    let code = night(at);
    state.last_exit = Some(code);
    state.write(runs_dir)?;
    log(&format!("the nightly run ended with exit code {code}"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::cell::{Cell, RefCell};

    struct FakeClock {
        now: Cell<DateTime<Local>>,
        /// Jumps: when the clock reaches the first time, it moves to the second (a suspend).
        jumps: RefCell<Vec<(DateTime<Local>, DateTime<Local>)>>,
    }

    impl Clock for FakeClock {
        fn now(&self) -> DateTime<Local> {
            self.now.get()
        }
        fn sleep(&self, d: Duration) {
            let mut t = self.now.get() + chrono::Duration::from_std(d).unwrap();
            let mut jumps = self.jumps.borrow_mut();
            if let Some(&(at, to)) = jumps.first() {
                if t >= at {
                    t = to;
                    jumps.remove(0);
                }
            }
            self.now.set(t);
        }
    }

    fn at(day: u32, h: u32, m: u32) -> DateTime<Local> {
        Local
            .with_ymd_and_hms(2026, 12, day, h, m, 0)
            .single()
            .unwrap()
    }

    /// Run the scheduler from `start` (with `suspend`: asleep from its first time to its second) until
    /// `until`; each run's (scheduled time, time it started), every run exiting with `code`.
    fn scheduled(
        dir: &Path,
        cron: &str,
        catch_up: bool,
        start: DateTime<Local>,
        suspend: Option<(DateTime<Local>, DateTime<Local>)>,
        until: DateTime<Local>,
        code: i32,
    ) -> Vec<(DateTime<Local>, DateTime<Local>)> {
        let clock = FakeClock {
            now: Cell::new(start),
            jumps: RefCell::new(suspend.into_iter().collect()),
        };
        let fired = RefCell::new(Vec::new());
        let schedule = Schedule::parse(cron).unwrap();
        run_scheduler(
            &schedule,
            dir,
            catch_up,
            &clock,
            || clock.now() < until,
            |t| {
                fired.borrow_mut().push((t, clock.now()));
                code
            },
            |_| {},
        )
        .unwrap();
        fired.into_inner()
    }

    #[test]
    fn runs_on_schedule_catches_up_once_after_a_sleep_and_after_a_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        // Started on the 1st at 23:00; asleep from 01:00 on the 3rd to 09:00 on the 4th (missing the
        // runs of the 3rd and the 4th); stopped on the 5th at 12:00.
        let suspend = (at(3, 1, 0), at(4, 9, 0));
        let fired = scheduled(
            dir.path(),
            "30 2 * * *",
            true,
            at(1, 23, 0),
            Some(suspend),
            at(5, 12, 0),
            0,
        );
        let times: Vec<_> = fired.iter().map(|(t, _)| *t).collect();
        // The 2nd on time; the 4th's (latest missed) once on waking; the 5th on time.
        assert_eq!(times, [at(2, 2, 30), at(4, 2, 30), at(5, 2, 30)]);
        assert_eq!(fired[1].1, at(4, 9, 0), "caught up on waking");
        let state = ScheduleState::read(dir.path());
        assert_eq!(state.last_fire, Some(at(5, 2, 30)));
        assert_eq!(state.last_exit, Some(0));

        // Shut down from the 5th at 12:00 to the 8th at 08:00: one catch-up run on start.
        let fired = scheduled(
            dir.path(),
            "30 2 * * *",
            true,
            at(8, 8, 0),
            None,
            at(8, 9, 0),
            5,
        );
        assert_eq!(fired, [(at(8, 2, 30), at(8, 8, 0))]);
        assert_eq!(ScheduleState::read(dir.path()).last_exit, Some(5));
    }

    #[test]
    fn without_catch_up_a_missed_run_waits_for_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let suspend = (at(2, 1, 0), at(2, 9, 0));
        let fired = scheduled(
            dir.path(),
            "0 30 2 * * *",
            false,
            at(1, 23, 0),
            Some(suspend),
            at(3, 12, 0),
            0,
        );
        let times: Vec<_> = fired.iter().map(|(t, _)| *t).collect();
        assert_eq!(times, [at(3, 2, 30)]);
    }

    #[test]
    fn prints_entries_for_the_systems_schedulers() {
        let s = Schedule::parse("0 30 2 * * *").unwrap();
        let line = s.crontab_line(Path::new("/usr/bin/pai-train"), Path::new("/home/me/.pai"));
        assert_eq!(
            line,
            "30 2 * * * PAI_HOME=/home/me/.pai /usr/bin/pai-train nightly >> /home/me/.pai/runs/nightly.log 2>&1"
        );
        let unit = s.systemd_service(Path::new("/usr/bin/pai-train"), Path::new("/home/me/.pai"));
        assert!(
            unit.contains("ExecStart=/usr/bin/pai-train schedule"),
            "{unit}"
        );
        assert!(
            unit.contains("Environment=PAI_HOME=/home/me/.pai"),
            "{unit}"
        );
    }
}
