//! The job summaries as a workflow author sees them: every Mermaid block the summary can emit
//! (a short job, an OOM, an OOM with memory by build, a two-hour job, 400 builds, a
//! keyword-named build) rendered by the real Mermaid (npm, pinned by tests/setup.sh) in
//! headless Chromium (Debian's), in a light and a dark page, at a half-hour time zone. Fails on any parse error and checks the facts a reader
//! needs are in the drawn SVG; the screenshots are kept as files (the test prints where).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use flywheel_agent::report::{Bootstrap, JobReport};
use flywheel_agent::summary::markdown;
use flywheel_agent::timeline::{Build, Samples};
use flywheel_agent::verdict::OomFacts;

const MERMAID: &str = "/var/cache/flywheel-tests/mermaid/node_modules/mermaid/dist/mermaid.min.js";

/// Chromium and Mermaid, or why not (a failure under CI=true, as tests/setup.sh installs both).
fn renderer() -> Option<PathBuf> {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    let why = match (&chromium, Path::new(MERMAID).exists()) {
        (None, _) => Some("no chromium (apt-get install chromium)"),
        (_, false) => Some("no mermaid (tests/setup.sh installs it)"),
        _ => None,
    };
    if let Some(why) = why {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "render: {why}, and CI must not skip it"
        );
        eprintln!("SKIP render: {why}");
    }
    chromium
}

fn report(name_first: &str, builds: usize, secs: f64, oom: bool) -> JobReport {
    let mut s = Samples::new(Duration::from_millis(250));
    for i in 0..(secs / 0.25) as u64 {
        s.push((8 + (i * 37) % 300) << 20);
    }
    JobReport {
        lane: "tinyland-nix".into(),
        envelope_bytes: 512 << 20,
        peak_bytes: Some(if oom { 512 << 20 } else { 310 << 20 }),
        samples: Some(s),
        builds: (0..builds)
            .map(|i| {
                let start = i as f64 * secs / builds as f64 / 2.0;
                Build {
                    name: if i == 0 {
                        name_first.to_owned()
                    } else {
                        format!("pkg-{i}-1.0")
                    },
                    start,
                    end: (start + secs / 3.0).min(secs),
                    failed: oom && i == 1,
                    memory_bytes: None,
                }
            })
            .collect(),
        bootstrap: Some(Bootstrap {
            done: flywheel_agent::nixboot::Report {
                relayed: Some("nix 2.8.0: warm (verified in 0.2 ms)".into()),
                ..Default::default()
            },
            elapsed: Duration::ZERO,
        }),
        paths: Some((builds as u64, 3)),
        oom: oom.then(|| OomFacts {
            lane: "tinyland-nix".into(),
            envelope_bytes: 512 << 20,
            stats: flywheel_agent::cgroup::Stats {
                oom_kills: 1,
                peak_bytes: Some(512 << 20),
                pids_max_hits: 0,
            },
            killed: Vec::new(),
            bigger_lane: None,
            building: vec!["pkg-1-1.0".into()],
            parallel: None,
            ran_at_once: 0,
            build_memory: Vec::new(),
        }),
        elapsed: Duration::from_secs_f64(secs),
        exit_code: Some(if oom { 137 } else { 0 }),
        ..JobReport::default()
    }
}

fn blocks(md: &str) -> Vec<String> {
    md.split("```mermaid\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap_or("").to_owned())
        .collect()
}

/// Render `blocks` in a page of `theme` (`default` on white, `dark` on GitHub's dark grey);
/// returns the DOM after rendering, and writes a screenshot to `png`.
fn render(chromium: &Path, dir: &Path, blocks: &[String], theme: &str, png: &Path) -> String {
    let page = dir.join(format!("{theme}.html"));
    let background = if theme == "dark" {
        "#0d1117"
    } else {
        "#ffffff"
    };
    let js_blocks = serde_json::to_string(blocks).expect("json");
    std::fs::copy(MERMAID, dir.join("mermaid.min.js")).expect("copy mermaid");
    std::fs::write(
        &page,
        format!(
            r#"<html><body style="background:{background};width:1000px"><div id="out"></div>
<script src="mermaid.min.js"></script><script>
mermaid.initialize({{ startOnLoad: false, theme: "{theme}" }});
(async () => {{
  const out = document.getElementById("out");
  const blocks = {js_blocks};
  for (let i = 0; i < blocks.length; i++) {{
    try {{
      const r = await mermaid.render("d" + i, blocks[i]);
      const d = document.createElement("div");
      d.className = "rendered";
      d.innerHTML = r.svg;
      out.appendChild(d);
    }} catch (e) {{
      const p = document.createElement("pre");
      p.className = "failed";
      p.textContent = "block " + i + ": " + e;
      out.appendChild(p);
    }}
  }}
}})();
</script></body></html>"#
        ),
    )
    .expect("write page");
    let run = |extra: &str| {
        Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--virtual-time-budget=10000",
                "--window-size=1000,2600",
                extra,
            ])
            .arg(format!("file://{}", page.display()))
            // A half-hour zone: `dateFormat x` drew a job's first second as 30:01 here.
            .env("TZ", "Asia/Kolkata")
            .output()
            .expect("run chromium")
    };
    let shot = run(&format!("--screenshot={}", png.display()));
    assert!(
        png.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&shot.stderr)
    );
    let dom = run("--dump-dom");
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    String::from_utf8_lossy(&dom.stdout).into_owned()
}

/// The text of the drawn SVG elements, tags stripped.
fn svg_text(dom: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in dom.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                out.push(' ');
            }
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out
}

#[test]
fn every_summary_chart_renders_with_the_facts_a_reader_needs() {
    let Some(chromium) = renderer() else { return };
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("summary-shots");
    std::fs::create_dir_all(&shots).expect("mkdir");
    let cases = [
        (
            "short",
            report("topAxis-1", 3, 1.4, false),
            vec![
                "whole job",
                "topAxis-1",
                "00:00",
                "00:01",
                "seconds since the job started",
            ],
        ),
        (
            "oom",
            report("llvm-18.1.8", 2, 40.0, true),
            vec!["✗ pkg-1-1.0", "00:00", "00:40"],
        ),
        (
            "oom-memory-by-build",
            {
                let mut r = report("llvm-18.1.8", 2, 40.0, true);
                r.builds[0].memory_bytes = Some(380 << 20);
                r.builds[1].memory_bytes = Some(90 << 20);
                r
            },
            vec![
                "✓ llvm-18.1.8 (380.0 MiB)",
                "✗ pkg-1-1.0 (90.0 MiB)",
                "00:40",
            ],
        ),
        (
            "two-hours",
            report("boost", 12, 7200.0, false),
            vec!["00:00", "02:00", "minutes since the job started"],
        ),
        (
            "400-builds",
            report("first", 400, 3000.0, false),
            vec!["whole job", "00:00"],
        ),
    ];
    for (name, r, facts) in cases {
        let md = markdown(&r);
        let bs = blocks(&md);
        assert_eq!(bs.len(), 2, "{name}: a memory chart and a gantt: {md}");
        for theme in ["default", "dark"] {
            let dir = shots.join(format!("{name}-{theme}"));
            std::fs::create_dir_all(&dir).expect("mkdir");
            let png = shots.join(format!("{name}-{theme}.png"));
            let dom = render(&chromium, &dir, &bs, theme, &png);
            assert!(
                !dom.contains("class=\"failed\""),
                "{name}/{theme}: Mermaid refused a block: {dom}"
            );
            assert_eq!(
                dom.matches("class=\"rendered\"").count(),
                2,
                "{name}/{theme}: {dom}"
            );
            let text = svg_text(&dom);
            for fact in facts
                .iter()
                .chain(&["Memory (MiB): the job (blue) and its 512.0 MiB envelope (red)"])
            {
                assert!(
                    text.contains(fact),
                    "{name}/{theme}: {fact:?} not drawn: {text}"
                );
            }
            // The series colours are the summary's own, whatever the theme.
            assert!(
                dom.contains("#1f6feb") && dom.contains("#d1242f"),
                "{name}/{theme}"
            );
            // No offset shifts the gantt: nothing drawn at half past.
            assert!(
                !text.contains("30:01") && !text.contains("05:30"),
                "{name}/{theme}: {text}"
            );
            eprintln!("render: {}", png.display());
        }
        if name == "400-builds" {
            assert!(
                md.contains("<summary>The other 370 builds</summary>"),
                "{md}"
            );
        }
    }
}
