//! What a workflow author sees of a job: a Markdown job summary (`$GITHUB_STEP_SUMMARY`) with
//! the job's memory over time against its envelope and the Nix builds its daemon ran, the same
//! as text for a terminal (`exec`), and annotations (`::error` / `::warning`) for the run's
//! page. Pure: the facts come in, text goes out.
//!
//! GitHub renders Mermaid blocks in job summaries; Mermaid refuses a diagram over 50 000
//! characters, and a step summary is at most 1 MiB. Both charts are pruned to stay well under
//! that (samples are merged, builds beyond the longest [`MAX_BUILDS`] are left out), and the
//! summary says when it pruned.

use std::fmt::Write as _;
use std::time::Duration;

use crate::report::JobReport;
use crate::size::Bytes;
use crate::timeline::{Build, Samples};
use crate::verdict::{bounded_list, LIST_MAX, NAME_MAX};

/// At most this many builds are drawn (a screenful): the failed and the longest ones; the
/// rest are listed in a table.
pub const MAX_BUILDS: usize = 30;
/// A Mermaid block stays under this many characters (Mermaid's limit is 50 000).
pub const MAX_DIAGRAM_CHARS: usize = 40_000;

fn mib(b: u64) -> u64 {
    b.div_ceil(1 << 20)
}

/// Mermaid labels: no quotes, colons, semicolons or hashes.
fn label(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '"' | ':' | ';' | '#' | '\n' | '\r' => ' ',
            c => c,
        })
        .take(60)
        .collect()
}

/// The builds that are drawn: the longest [`MAX_BUILDS`] (and every failed one), by start.
fn drawn(builds: &[Build]) -> Vec<&Build> {
    let mut v: Vec<&Build> = builds.iter().collect();
    v.sort_by(|a, b| {
        (b.failed, b.end - b.start)
            .partial_cmp(&(a.failed, a.end - a.start))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    v.truncate(MAX_BUILDS);
    v.sort_by(|a, b| {
        a.start
            .partial_cmp(&b.start)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    v
}

/// Series colours that read on GitHub's light and dark pages: the job's line in blue, the
/// envelope in red (Mermaid's default palette draws a first line almost white on white).
pub const JOB_COLOUR: &str = "#1f6feb";
pub const ENVELOPE_COLOUR: &str = "#d1242f";

/// The time axis of a chart: seconds for jobs under ten minutes, minutes after.
fn time_axis(elapsed: f64) -> (&'static str, f64) {
    if elapsed < 600.0 {
        ("seconds", 1.0)
    } else {
        ("minutes", 60.0)
    }
}

fn memory_chart(r: &JobReport, s: &Samples) -> String {
    let points = s.points();
    let top = mib(r
        .envelope_bytes
        .max(points.iter().copied().max().unwrap_or(0)));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "```mermaid\n---\nconfig:\n  xyChart:\n    width: 900\n    height: 360\n  themeVariables:\n    xyChart:\n      plotColorPalette: \"{JOB_COLOUR}, {ENVELOPE_COLOUR}\"\n---\nxychart-beta"
    );
    let _ = writeln!(
        out,
        "    title \"Memory (MiB): the job (blue) and its {} envelope (red)\"",
        Bytes(r.envelope_bytes)
    );
    // The axis ends where the job ended (a last partial point is drawn at the end).
    let sampled = s.interval.as_secs_f64() * points.len().max(1) as f64;
    let end = if r.elapsed.is_zero() {
        sampled
    } else {
        r.elapsed.as_secs_f64()
    };
    let (unit, per) = time_axis(end);
    let end = end / per;
    let end = if end >= 10.0 {
        format!("{:.0}", end.ceil())
    } else {
        format!("{:.1}", (end * 10.0).ceil() / 10.0)
    };
    let _ = writeln!(
        out,
        "    x-axis \"{unit} since the job started\" 0 --> {end}"
    );
    let _ = writeln!(out, "    y-axis \"MiB\" 0 --> {}", top + top / 20 + 1);
    let values: Vec<String> = points.iter().map(|b| mib(*b).to_string()).collect();
    let _ = writeln!(out, "    line [{}]", values.join(", "));
    let envelope: Vec<String> = points
        .iter()
        .map(|_| mib(r.envelope_bytes).to_string())
        .collect();
    let _ = writeln!(out, "    line [{}]", envelope.join(", "));
    out.push_str("```\n");
    out
}

/// A gantt time: a fixed day in mid-January (no time zone changes its clocks then) read and
/// drawn in the viewer's local time alike, so no offset shifts it (`dateFormat x`, epoch
/// milliseconds, is drawn in local time: at a half-hour zone a job's first second read
/// `30:01`).
fn gantt_time(secs: f64) -> String {
    let ms = (secs.max(0.0) * 1000.0).round() as u64;
    let (s, ms) = (ms / 1000, ms % 1000);
    format!(
        "2001-01-{:02} {:02}:{:02}:{:02}.{ms:03}",
        10 + s / 86_400,
        s % 86_400 / 3600,
        s % 3600 / 60,
        s % 60
    )
}

/// Ticks every so often that a job's length shows in about eight of them.
fn tick(elapsed: f64) -> (&'static str, &'static str) {
    const STEPS: [(f64, &str); 14] = [
        (1.0, "1second"),
        (2.0, "2second"),
        (5.0, "5second"),
        (10.0, "10second"),
        (15.0, "15second"),
        (30.0, "30second"),
        (60.0, "1minute"),
        (120.0, "2minute"),
        (300.0, "5minute"),
        (600.0, "10minute"),
        (900.0, "15minute"),
        (1800.0, "30minute"),
        (3600.0, "1hour"),
        (7200.0, "2hour"),
    ];
    let step = STEPS
        .iter()
        .find(|(s, _)| elapsed / s <= 8.0)
        .map_or("4hour", |(_, t)| t);
    let format = if elapsed < 3600.0 { "%M:%S" } else { "%H:%M" };
    (step, format)
}

fn build_chart(builds: &[&Build], elapsed: f64) -> String {
    let end = builds
        .iter()
        .map(|b| b.end)
        .fold(elapsed, f64::max)
        .max(0.001);
    let (step, format) = tick(end);
    let mut out = format!(
        "```mermaid\ngantt\n    title Nix builds, on the memory chart's time scale\n    dateFormat YYYY-MM-DD HH:mm:ss.SSS\n    axisFormat {format}\n    tickInterval {step}\n    todayMarker off\n    section job\n    whole job :active, job, {}, {}\n    section builds\n",
        gantt_time(0.0),
        gantt_time(end)
    );
    for (i, b) in builds.iter().enumerate() {
        // A mark first: a derivation named like a Mermaid keyword (`topAxis-1`) stays a task.
        let line = format!(
            "    {} {}{} :{}b{i}, {}, {}\n",
            if b.failed { "✗" } else { "✓" },
            label(&b.name),
            b.memory_bytes
                .map(|m| format!(" ({})", Bytes(m)))
                .unwrap_or_default(),
            if b.failed { "crit, " } else { "done, " },
            gantt_time(b.start),
            gantt_time(b.end.max(b.start + 0.001))
        );
        if out.len() + line.len() + 4 > MAX_DIAGRAM_CHARS {
            break;
        }
        out.push_str(&line);
    }
    out.push_str("```\n");
    out
}

/// The builds not drawn, as a table (the longest first), bounded.
fn build_table(rest: &[&Build]) -> String {
    let mut v: Vec<&&Build> = rest.iter().collect();
    v.sort_by(|a, b| {
        (b.end - b.start)
            .partial_cmp(&(a.end - a.start))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let mut out = format!(
        "\n<details><summary>The other {} builds</summary>\n\n| build | started | took | memory |\n| --- | --- | --- | ---: |\n",
        rest.len()
    );
    for b in v.iter().take(TABLE_MAX) {
        let name = bounded_list(&[b.name.replace('|', "\\|")], 1, NAME_MAX);
        let _ = writeln!(
            out,
            "| `{name}`{} | {} | {} | {} |",
            if b.failed { " (not finished)" } else { "" },
            human_duration(Duration::from_secs_f64(b.start.max(0.0))),
            human_duration(Duration::from_secs_f64((b.end - b.start).max(0.0))),
            b.memory_bytes
                .map_or_else(String::new, |m| Bytes(m).to_string())
        );
    }
    if rest.len() > TABLE_MAX {
        let _ = writeln!(out, "\nand {} shorter ones.", rest.len() - TABLE_MAX);
    }
    out.push_str("\n</details>\n");
    out
}

/// At most this many builds in the table of those not drawn.
pub const TABLE_MAX: usize = 200;
/// At most this many builds in the table of memory by build.
pub const MEMORY_TABLE_MAX: usize = 10;

/// The builds whose memory was sampled, the largest first.
fn by_memory(builds: &[Build]) -> Vec<&Build> {
    let mut v: Vec<&Build> = builds.iter().filter(|b| b.memory_bytes.is_some()).collect();
    v.sort_by_key(|b| std::cmp::Reverse(b.memory_bytes));
    v
}

/// The builds that used the most memory, as a table (the largest first), and how the figures
/// were taken.
fn memory_table(r: &JobReport) -> String {
    let v = by_memory(&r.builds);
    if v.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "\n**Memory by build** (of the {} envelope):\n\n| build | memory | of the envelope | took |\n| --- | ---: | ---: | --- |\n",
        Bytes(r.envelope_bytes)
    );
    for b in v.iter().take(MEMORY_TABLE_MAX) {
        let m = b.memory_bytes.unwrap_or(0);
        let name = bounded_list(&[b.name.replace('|', "\\|")], 1, NAME_MAX);
        let _ = writeln!(
            out,
            "| {} `{name}` | {} | {:.0}% | {} |",
            if b.failed { "✗" } else { "✓" },
            Bytes(m),
            percent(m, r.envelope_bytes),
            human_duration(Duration::from_secs_f64((b.end - b.start).max(0.0)))
        );
    }
    if v.len() > MEMORY_TABLE_MAX {
        let _ = writeln!(
            out,
            "\nand {} builds that used less.",
            v.len() - MEMORY_TABLE_MAX
        );
    }
    let every = r.samples.as_ref().map_or(0.25, |s| s.tick().as_secs_f64());
    let _ = writeln!(
        out,
        "\nThe most a build's processes held at one sample (every {every:.2} s): their anonymous memory, what compilers and linkers allocate. Files, the page cache and tmpfs are the job's, not a build's; a spike between samples shows in the job's line only."
    );
    out
}

/// How the job's memory went, in a word: what the verdict line starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// The kernel OOM-killed something in the job.
    OutOfMemory,
    /// The peak came within [`CLOSE_PERCENT`] of the envelope.
    Close,
    Fits,
    /// The kernel did not report a peak.
    Unknown,
}

/// A peak at or above this share of the envelope is "close".
pub const CLOSE_PERCENT: f64 = 90.0;

impl JobReport {
    pub fn fit(&self) -> Fit {
        match (self.oom.is_some(), self.peak_bytes) {
            (true, _) => Fit::OutOfMemory,
            (false, None) => Fit::Unknown,
            (false, Some(p)) if percent(p, self.envelope_bytes) >= CLOSE_PERCENT => Fit::Close,
            (false, Some(_)) => Fit::Fits,
        }
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    part as f64 * 100.0 / whole.max(1) as f64
}

/// A duration as a person reads it: `1.4 s`, `3 min 12 s`, `2 h 05 min`.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        format!("{} min {:02} s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!(
            "{} h {:02} min",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    }
}

/// An exit status as a person reads it: `exit status 2`, `killed by signal 9 (exit status 137)`.
pub fn exit_words(code: i32) -> String {
    if (129..=192).contains(&code) {
        format!("killed by signal {} (exit status {code})", code - 128)
    } else {
        format!("exit status {code}")
    }
}

/// The verdict: whether the job fit its envelope and how close it came, then its exit status
/// (when known) and its duration. The same words start the Markdown summary, `exec`'s output
/// and the runner hook's log line.
pub fn verdict(r: &JobReport) -> String {
    let env = Bytes(r.envelope_bytes);
    let peak = |p: u64| {
        format!(
            "peak {} of the {env} envelope ({:.0}%)",
            Bytes(p),
            percent(p, r.envelope_bytes)
        )
    };
    let head = match (r.fit(), r.peak_bytes) {
        (Fit::OutOfMemory, Some(p)) => format!("out of memory: {}", peak(p)),
        (Fit::OutOfMemory, None) => format!("out of memory in the {env} envelope"),
        (Fit::Close, Some(p)) => format!("fits, barely: {}", peak(p)),
        (Fit::Fits, Some(p)) => format!("fits: {}", peak(p)),
        (_, _) => format!("peak memory unknown (the kernel reports none here); envelope {env}"),
    };
    let mut out = head;
    if let Some(c) = r.exit_code {
        let _ = write!(out, ", {}", exit_words(c));
    }
    let _ = write!(out, ", {} on lane `{}`", human_duration(r.elapsed), r.lane);
    out
}

/// What the job's Nix did to its store, in words: what it built and what it substituted.
fn store_work(built: u64, substituted: u64) -> String {
    let paths = |n: u64| {
        if n == 1 {
            "1 store path".to_owned()
        } else {
            format!("{n} store paths")
        }
    };
    match (built, substituted) {
        (0, 0) => "nothing built or substituted: everything was already in the store".to_owned(),
        (0, s) => format!("nothing built; {} substituted from caches", paths(s)),
        (b, 0) => format!("{} built here, nothing substituted", paths(b)),
        (b, s) => format!("{} built here, {s} substituted from caches", paths(b)),
    }
}

/// The job summary, Markdown: the verdict first, the verdicts' details, the charts, then the
/// setup facts folded away.
pub fn markdown(r: &JobReport) -> String {
    let mut out = String::new();
    let icon = match r.fit() {
        Fit::OutOfMemory => "❌",
        Fit::Close => "⚠️",
        Fit::Fits => "✅",
        Fit::Unknown => "❔",
    };
    let v = verdict(r);
    let mut chars = v.chars();
    let capital: String = chars
        .next()
        .map(|c| c.to_uppercase().collect::<String>())
        .unwrap_or_default();
    let _ = writeln!(out, "### {icon} {capital}{}\n", chars.as_str());
    if let Some((built, subst)) = r.paths {
        let _ = writeln!(out, "Nix: {}.\n", store_work(built, subst));
    }
    if let Some(v) = r.oom_verdict() {
        let _ = writeln!(out, "> [!CAUTION]\n> {}\n", v.replace('\n', "\n> "));
    }
    if let Some(p) = r.pids_note() {
        let _ = writeln!(out, "> [!WARNING]\n> {p}\n");
    }
    if let Some(s) = r.samples.as_ref().filter(|s| !s.bytes.is_empty()) {
        out.push_str(&memory_chart(r, s));
        let _ = writeln!(
            out,
            "\nMemory: `{}`\n",
            sparkline(&s.bytes, r.envelope_bytes)
        );
    }
    if !r.builds.is_empty() {
        let shown = drawn(&r.builds);
        let chart = build_chart(&shown, r.elapsed.as_secs_f64());
        let drawn_n = chart.matches(":done, ").count() + chart.matches(":crit, ").count();
        out.push_str(&chart);
        if drawn_n < r.builds.len() {
            let _ = writeln!(
                out,
                "\nShowing the {drawn_n} longest (and failed) of {} builds.",
                r.builds.len()
            );
            let rest: Vec<&Build> = r
                .builds
                .iter()
                .filter(|b| !shown[..drawn_n].iter().any(|d| std::ptr::eq(*d, *b)))
                .collect();
            out.push_str(&build_table(&rest));
        }
        out.push_str(&memory_table(r));
        let failed: Vec<&str> = r
            .builds
            .iter()
            .filter(|b| b.failed)
            .map(|b| b.name.as_str())
            .collect();
        if !failed.is_empty() {
            let _ = writeln!(
                out,
                "\nNot finished (failed or killed): {}",
                bounded_list(&failed, LIST_MAX, NAME_MAX)
            );
        }
    }
    let mut setup = Vec::new();
    if let Some(b) = &r.bootstrap {
        setup.push(format!("- Nix bootstrap: {}", b.line()));
    }
    if let Some(s) = &r.store {
        setup.push(format!("- Store: {s}"));
    }
    if let Some(p) = &r.published {
        setup.push(format!("- Published: {p}"));
    }
    if !setup.is_empty() {
        let _ = writeln!(
            out,
            "\n<details><summary>Setup: Nix bootstrap, store, publishing</summary>\n\n{}\n\n</details>",
            setup.join("\n")
        );
    }
    out
}

const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// A one-line chart of memory against the envelope (█ = the envelope).
pub fn sparkline(bytes: &[u64], envelope: u64) -> String {
    // At most 60 columns: merge samples (the larger wins).
    let per = bytes.len().div_ceil(60).max(1);
    bytes
        .chunks(per)
        .map(|c| {
            let v = c.iter().copied().max().unwrap_or(0);
            let i = (v as f64 / envelope.max(1) as f64 * 7.0).round() as usize;
            BARS[i.min(7)]
        })
        .collect()
}

/// The summary for a terminal (`exec`): the verdict first, then memory over time, the store's
/// work and the longest builds.
pub fn text(r: &JobReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "flywheel: {}", verdict(r));
    if let Some(s) = r.samples.as_ref().filter(|s| !s.points().is_empty()) {
        let points = s.points();
        let _ = writeln!(
            out,
            "flywheel: memory {} (of the envelope, every {:.2} s)",
            sparkline(&points, r.envelope_bytes),
            s.interval.as_secs_f64() * points.len().div_ceil(60).max(1) as f64
        );
    }
    if let Some((built, subst)) = r.paths {
        let _ = writeln!(out, "flywheel: nix: {}", store_work(built, subst));
    }
    let biggest = by_memory(&r.builds);
    if !biggest.is_empty() {
        let named: Vec<String> = biggest
            .iter()
            .map(|b| format!("{} {}", b.name, Bytes(b.memory_bytes.unwrap_or(0))))
            .collect();
        let _ = writeln!(
            out,
            "flywheel: memory by build (sampled): {}",
            bounded_list(&named, 3, NAME_MAX)
        );
    }
    let mut longest: Vec<&Build> = r.builds.iter().collect();
    longest.sort_by(|a, b| {
        (b.end - b.start)
            .partial_cmp(&(a.end - a.start))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    for b in longest.iter().take(5) {
        let _ = writeln!(
            out,
            "flywheel: build {} {:.1} s{}{}",
            b.name,
            b.end - b.start,
            b.memory_bytes
                .map(|m| format!(", {}", Bytes(m)))
                .unwrap_or_default(),
            if b.failed { " (not finished)" } else { "" }
        );
    }
    out
}

/// An annotation line for the runner (`::error title=…::message`), escaped as the runner's
/// workflow commands require.
pub fn annotation(kind: &str, title: &str, message: &str) -> String {
    let esc = |s: &str, prop: bool| {
        let mut t = s
            .replace('%', "%25")
            .replace('\r', "%0D")
            .replace('\n', "%0A");
        if prop {
            t = t.replace(':', "%3A").replace(',', "%2C");
        }
        t
    };
    format!(
        "::{kind} title={}::{}",
        esc(title, true),
        esc(message, false)
    )
}

/// The annotations a job's summary makes on the run's page: an `::error` for an OOM, a
/// `::warning` for a process-limit hit. The runner's completed hook and `exec` in a workflow
/// step print the same.
pub fn annotations(r: &JobReport) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(f) = &r.oom {
        out.push(annotation(
            "error",
            &format!(
                "Out of memory on lane {} ({} envelope)",
                r.lane,
                Bytes(r.envelope_bytes)
            ),
            &crate::verdict::oom_sentence(f),
        ));
    }
    if let Some(p) = r.pids {
        out.push(annotation(
            "warning",
            &format!("Process limit reached on lane {}", r.lane),
            &crate::verdict::pids_sentence(&r.lane, p.limit, p.refused),
        ));
    }
    out
}

/// The job's Bazel cache in one line: `exec`'s output and the completed hook's log.
pub fn bazel_line(t: &crate::bazel::Tally) -> String {
    let memory = if t.from_memory > 0 {
        format!(" ({} from the agent's memory)", t.from_memory)
    } else {
        String::new()
    };
    let mut s = format!(
        "bazel cache: {} hits{memory}, {} misses, {} read, {} written",
        t.hits,
        t.misses,
        Bytes(t.bytes_read),
        Bytes(t.bytes_written)
    );
    if t.writes_dropped > 0 {
        s.push_str(&format!(
            ", {} writes dropped{}",
            t.writes_dropped,
            if t.trusted {
                ""
            } else {
                " (not a trusted job)"
            }
        ));
    }
    if t.writes_refused > 0 {
        s.push_str(&format!(", {} writes refused", t.writes_refused));
    }
    if t.upstream_failures > 0 {
        s.push_str(&format!(
            ", {} upstream failures (the build went on without the cache)",
            t.upstream_failures
        ));
    }
    match t.unused {
        Some(crate::bazel::Unused::Open) => s.push_str(
            "; not used: the lane's cache takes writes without credentials (anything may have written it)",
        ),
        Some(crate::bazel::Unused::Unverified) => s.push_str(
            "; not used: the lane's cache did not refuse a write without credentials (the agent's probe got another answer, or none)",
        ),
        None => {}
    }
    s
}

/// The job summary's Bazel cache section (Markdown), appended after the rest.
pub fn bazel_section(t: &crate::bazel::Tally) -> String {
    let reads = t.hits + t.misses;
    let rate = if reads == 0 {
        "no reads".to_owned()
    } else {
        format!("{:.0}% hits", percent(t.hits, reads))
    };
    let rate = if t.from_memory > 0 {
        format!(
            "{rate} ({} answered from the agent's memory)",
            t.from_memory
        )
    } else {
        rate
    };
    let writes = if t.trusted && t.can_write {
        "writes go to the lane's cache (a trusted job)"
    } else if t.trusted {
        "reads only: the agent holds no write credential for the lane's cache (a trusted job)"
    } else {
        "writes are answered and dropped (not a trusted job)"
    };
    let open = match t.unused {
        Some(crate::bazel::Unused::Open) => "> [!CAUTION]\n> The lane's Bazel cache took a write without credentials: anything that reaches it can write it, a pull request's job too, so what it serves may be poisoned. This job neither read nor wrote it (every read a miss, every write dropped). Its operators: put `PUT` behind authentication.\n\n",
        Some(crate::bazel::Unused::Unverified) => "> [!WARNING]\n> The lane's Bazel cache did not refuse the agent's write without credentials (it answered something other than 401, 403 or 405, or nothing), so it could not be shown that a pull request cannot write it. This job neither read nor wrote it (every read a miss, every write dropped); the agent asks again every 30 s.\n\n",
        None => "",
    };
    format!(
        "\n### Bazel remote cache\n\n{open}{rate}; {writes}.\n\n| hits | misses | read | written | writes dropped | writes refused | upstream failures |\n|---:|---:|---:|---:|---:|---:|---:|\n| {} | {} | {} | {} | {} | {} | {} |\n",
        t.hits,
        t.misses,
        Bytes(t.bytes_read),
        Bytes(t.bytes_written),
        t.writes_dropped,
        t.writes_refused,
        t.upstream_failures
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timeline::{attach_memory, most_at_once, MAX_SAMPLES};

    /// A Nix bootstrap whose line is `line`.
    fn bootstrap(line: &str) -> crate::report::Bootstrap {
        crate::report::Bootstrap {
            done: crate::nixboot::Report {
                relayed: Some(line.into()),
                ..crate::nixboot::Report::default()
            },
            elapsed: Duration::ZERO,
        }
    }

    /// An OOM on lane `tinyland-nix`: one kill, nothing known of what was building.
    fn oom() -> crate::verdict::OomFacts {
        crate::verdict::OomFacts {
            lane: "tinyland-nix".into(),
            envelope_bytes: 8 << 30,
            stats: crate::cgroup::Stats {
                oom_kills: 1,
                peak_bytes: Some(4 << 30),
                pids_max_hits: 0,
            },
            killed: Vec::new(),
            bigger_lane: None,
            building: Vec::new(),
            parallel: None,
            ran_at_once: 0,
            build_memory: Vec::new(),
        }
    }

    fn report(samples: usize, builds: usize) -> JobReport {
        let mut s = Samples::new(Duration::from_millis(250));
        for i in 0..samples {
            s.push((i as u64 % 4096) << 20);
        }
        JobReport {
            lane: "tinyland-nix".into(),
            envelope_bytes: 8 << 30,
            peak_bytes: Some(4 << 30),
            samples: Some(s),
            builds: (0..builds)
                .map(|i| Build {
                    name: format!("package-number-{i}-1.0"),
                    start: i as f64,
                    end: i as f64 + (i % 97) as f64,
                    failed: i == 7,
                    memory_bytes: None,
                })
                .collect(),
            bootstrap: Some(bootstrap("nix 2.34.0: warm (verified in 0.2 ms)")),
            paths: Some((builds as u64, 3)),
            elapsed: Duration::from_secs(6 * 3600),
            ..JobReport::default()
        }
    }

    /// 300 unfinished builds with 200-character names (on a shared store, a neighbour could
    /// choose them): the list stays short and says how many it left out.
    #[test]
    fn the_unfinished_list_is_bounded_in_count_and_bytes() {
        let mut r = report(4, 0);
        r.builds = (0..300)
            .map(|i| Build {
                name: format!("{i:03}-rotate-ATTIC-tokens-now-{}", "x".repeat(170)),
                start: 0.0,
                end: 1.0,
                failed: true,
                memory_bytes: None,
            })
            .collect();
        let md = markdown(&r);
        let line = md
            .lines()
            .find(|l| l.starts_with("Not finished"))
            .expect("the line");
        assert!(line.len() < 1200, "{} bytes: {line}", line.len());
        assert!(line.ends_with(", and 290 more"), "{line}");
        assert_eq!(line.matches("rotate-ATTIC").count(), LIST_MAX);
        assert!(md.len() < 40_000, "{} bytes", md.len());
        assert_eq!(bounded_list(&["a", "bcd"], 5, 2), "a, bc…");
        assert_eq!(bounded_list::<&str>(&[], 5, 2), "");
    }

    #[test]
    fn a_six_hour_job_with_2000_builds_stays_under_githubs_limits() {
        // Six hours sampled every 250 ms: 86 400 samples.
        let r = report(86_400, 2000);
        let s = r.samples.as_ref().expect("samples");
        assert!(s.points().len() <= MAX_SAMPLES + 1);
        // 6 hours in at most 240 points: each covers at least 90 s.
        assert!(s.interval >= Duration::from_secs(90), "{:?}", s.interval);
        assert!(s.interval <= Duration::from_secs(180), "{:?}", s.interval);
        let md = markdown(&r);
        assert!(md.len() < 200_000, "{} bytes", md.len());
        for block in md.split("```mermaid").skip(1) {
            let block = block.split("```").next().unwrap_or("");
            assert!(block.len() < MAX_DIAGRAM_CHARS, "{}", block.len());
        }
        assert!(
            md.contains("Showing the 30 longest (and failed) of 2000 builds."),
            "{md}"
        );
        // The failed build is always drawn, as critical.
        assert!(md.contains("✗ package-number-7-1.0 :crit, "), "{md}");
        // The rest in a table, bounded; six hours in hours and minutes on the gantt.
        assert!(
            md.contains("<summary>The other 1970 builds</summary>"),
            "{md}"
        );
        assert!(md.contains("and 1770 shorter ones."), "{md}");
        assert!(
            md.contains("axisFormat %H:%M\n    tickInterval 1hour"),
            "{md}"
        );
        assert!(
            md.contains("x-axis \"minutes since the job started\" 0 --> 360\n"),
            "{md}"
        );
        assert!(md.contains("xychart-beta") && md.contains("gantt"));
    }

    #[test]
    fn the_chart_draws_the_envelope_and_the_oom_is_on_top() {
        let mut r = report(10, 2);
        r.oom = Some(oom());
        let md = markdown(&r);
        assert!(
            md.starts_with("### ❌ Out of memory: peak 4.0 GiB of the 8.0 GiB envelope (50%), 6 h 00 min on lane `tinyland-nix`\n"),
            "{md}"
        );
        assert!(!md.contains("| |"), "no empty header row: {md}");
        assert!(md.contains("<details><summary>Setup"), "{md}");
        assert!(md.contains("> [!CAUTION]\n> flywheel: out of memory"));
        // The envelope is the second line, at 8192 MiB for every sample.
        assert!(md.contains(&format!("line [{}]", ["8192"; 10].join(", "))));
        let t = text(&r);
        assert!(
            t.contains("flywheel: memory ") && t.contains("peak 4.0 GiB"),
            "{t}"
        );
    }

    #[test]
    fn the_verdict_states_fit_exit_status_and_duration() {
        let mut r = report(4, 0);
        r.exit_code = Some(2);
        r.elapsed = Duration::from_millis(1400);
        assert_eq!(
            verdict(&r),
            "fits: peak 4.0 GiB of the 8.0 GiB envelope (50%), exit status 2, 1.4 s on lane `tinyland-nix`"
        );
        r.peak_bytes = Some(15 << 29);
        r.exit_code = Some(137);
        r.elapsed = Duration::from_secs(192);
        assert_eq!(
            verdict(&r),
            "fits, barely: peak 7.5 GiB of the 8.0 GiB envelope (94%), killed by signal 9 (exit status 137), 3 min 12 s on lane `tinyland-nix`"
        );
        assert!(text(&r).starts_with("flywheel: fits, barely: "));
        assert!(markdown(&r).starts_with("### ⚠️ Fits, barely: "));
        assert!(annotations(&r).is_empty());
        r.oom = Some(oom());
        let v = crate::verdict::oom_verdict(&oom());
        assert!(v.starts_with("flywheel: out of memory: "), "{v}");
        assert_eq!(
            annotations(&r),
            [format!(
                "::error title=Out of memory on lane tinyland-nix (8.0 GiB envelope)::{}",
                &v["flywheel: ".len()..]
            )]
        );
        // The process limit: a warning with the note's sentence.
        r.oom = None;
        r.pids = Some(crate::report::PidsHit {
            limit: 512,
            refused: 3,
        });
        assert_eq!(
            annotations(&r),
            ["::warning title=Process limit reached on lane tinyland-nix::the job on lane `tinyland-nix` hit its process limit of 512 (3 forks refused); a fork bomb or runaway parallelism is the usual cause."]
        );
        r.paths = Some((0, 0));
        assert!(text(&r).contains("flywheel: nix: nothing built or substituted"));
    }

    #[test]
    fn gantt_times_cannot_shift_with_the_viewers_zone_nor_collide_with_keywords() {
        assert_eq!(gantt_time(0.0), "2001-01-10 00:00:00.000");
        assert_eq!(gantt_time(3723.25), "2001-01-10 01:02:03.250");
        assert_eq!(gantt_time(86_401.0), "2001-01-11 00:00:01.000");
        let mut r = report(4, 0);
        r.elapsed = Duration::from_millis(1400);
        r.builds = vec![Build {
            name: "topAxis-1".into(),
            start: 0.2,
            end: 1.1,
            failed: false,
            memory_bytes: None,
        }];
        let md = markdown(&r);
        assert!(
            md.contains(
                "    ✓ topAxis-1 :done, b0, 2001-01-10 00:00:00.200, 2001-01-10 00:00:01.100\n"
            ),
            "{md}"
        );
        assert!(md.contains("tickInterval 1second"), "{md}");
        assert!(
            md.contains("whole job :active, job, 2001-01-10 00:00:00.000, 2001-01-10 00:00:01.400"),
            "{md}"
        );
        assert!(
            md.contains("x-axis \"seconds since the job started\" 0 --> 1.4\n"),
            "{md}"
        );
        assert!(
            md.contains(&format!(
                "plotColorPalette: \"{JOB_COLOUR}, {ENVELOPE_COLOUR}\""
            )),
            "{md}"
        );
    }

    #[test]
    fn builds_at_once_count_overlaps_only() {
        let b = |start, end| Build {
            name: "x".into(),
            start,
            end,
            failed: false,
            memory_bytes: None,
        };
        assert_eq!(most_at_once(&[]), 0);
        assert_eq!(most_at_once(&[b(0.0, 1.0), b(1.0, 2.0)]), 1);
        assert_eq!(most_at_once(&[b(0.0, 3.0), b(1.0, 2.0), b(1.5, 4.0)]), 3);
    }

    #[test]
    fn samples_merge_keeping_the_largest() {
        let mut s = Samples::new(Duration::from_secs(1));
        for i in 0..=MAX_SAMPLES as u64 {
            s.push(i);
        }
        assert_eq!(s.points().len(), MAX_SAMPLES / 2 + 1);
        assert_eq!(s.interval, Duration::from_secs(2));
        assert_eq!(s.points()[0], 1);
        assert_eq!(s.points().last().copied(), Some(MAX_SAMPLES as u64));
        // Later samples fill points of the new width: two samples a point.
        s.push(1000);
        assert_eq!(
            s.points().len(),
            MAX_SAMPLES / 2 + 2,
            "a partial point shows"
        );
        s.push(0);
        assert_eq!(s.points().last().copied(), Some(1000));
        s.close(5000);
        assert_eq!(s.points().last().copied(), Some(5000));
    }

    #[test]
    fn a_peak_between_samples_is_drawn_in_the_interval_where_it_rose() {
        let mut s = Samples::new(Duration::from_secs(1));
        // The mark rose to 300 between the second and third samples, then fell back.
        s.record(10, Some(10));
        s.record(20, Some(20));
        s.record(30, Some(300));
        s.record(40, Some(300));
        // A later spike below the old mark is not seen (the mark did not rise).
        s.record(50, Some(300));
        assert_eq!(s.points(), [10, 20, 300, 40, 50]);
        // The job's end: a peak above the last mark rose in the last, partial interval; no
        // point is added for a peak already drawn.
        let mut a = s.clone();
        a.close(300);
        assert_eq!(a.points(), [10, 20, 300, 40, 50]);
        s.close(900);
        assert_eq!(s.points(), [10, 20, 300, 40, 50, 900]);
        // Without a mark (a kernel without `memory.peak`), the samples alone.
        let mut n = Samples::new(Duration::from_secs(1));
        n.record(7, None);
        n.record(8, None);
        assert_eq!(n.points(), [7, 8]);
    }

    #[test]
    fn memory_by_build_is_a_table_the_largest_first_and_labels_the_gantt() {
        let mut r = report(8, 3);
        r.elapsed = Duration::from_secs(120);
        let seen = |name: &str, bytes, last_seen| crate::buildmem::BuildUse {
            name: name.into(),
            bytes,
            last_seen,
        };
        // Build 1 ends at 2 s by its log, build 2 (not finished) at 4 s, though a sample saw
        // it at 5.5 s.
        r.builds[2].failed = true;
        attach_memory(
            &mut r.builds,
            &[
                seen("package-number-2-1.0", 5 << 30, 1005.5),
                seen("package-number-1-1.0", 2 << 30, 1009.0),
            ],
            1000.0,
        );
        assert_eq!(r.builds[0].memory_bytes, None);
        assert_eq!((r.builds[1].end, r.builds[2].end), (2.0, 5.5));
        let md = markdown(&r);
        let table = md
            .split("**Memory by build** (of the 8.0 GiB envelope):")
            .nth(1)
            .unwrap_or_else(|| panic!("no table: {md}"));
        let big = table.find("| ✗ `package-number-2-1.0` | 5.0 GiB | 62% |");
        let small = table.find("| ✓ `package-number-1-1.0` | 2.0 GiB | 25% |");
        assert!(big.is_some() && small.is_some() && big < small, "{md}");
        assert!(!table.contains("package-number-0-1.0"), "{md}");
        assert!(table.contains("anonymous memory"), "how exact it is: {md}");
        assert!(
            md.contains("    ✗ package-number-2-1.0 (5.0 GiB) :crit, "),
            "{md}"
        );
        let t = text(&r);
        assert!(
            t.contains("flywheel: memory by build (sampled): package-number-2-1.0 5.0 GiB, package-number-1-1.0 2.0 GiB\n"),
            "{t}"
        );
        assert!(
            t.contains("flywheel: build package-number-2-1.0 3.5 s, 5.0 GiB (not finished)\n"),
            "{t}"
        );
    }

    #[test]
    fn annotations_are_escaped_like_workflow_commands() {
        assert_eq!(
            annotation("error", "OOM: lane a, 8Gi", "line 1\nline 2 100%"),
            "::error title=OOM%3A lane a%2C 8Gi::line 1%0Aline 2 100%25"
        );
        assert_eq!(sparkline(&[0, 4, 8], 8), "▁▅█");
    }
}
