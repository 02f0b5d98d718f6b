//! The report in a real browser: headless Chromium loads the generated page from a
//! file:// URL; the test checks that its tables are there, that every image loads with
//! its stated size, that no script from the records runs, and takes a screenshot.
//!
//! Chromium is found on PATH (Debian's `chromium`), or installed with apt-get when running
//! as root. Without it the test prints a notice and passes, unless HVBENCH_REQUIRE_BROWSER=1
//! makes it fail (CI sets it where Chromium is installed).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reports::report::{render, ReportOptions};

const CANDIDATES: &[&str] = &["chromium", "chromium-browser", "google-chrome"];
const PROBE_MARK: &str = "hvbench-probe:";

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

fn apt_get(args: &[&str]) -> bool {
    Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Chromium, installed if need be and possible; Err says why there is none.
fn find_chromium() -> Result<PathBuf, String> {
    let find = || CANDIDATES.iter().find_map(|name| on_path(name));
    if let Some(found) = find() {
        return Ok(found);
    }
    if !is_root() {
        return Err(
            "chromium is not installed and this test is not root, so it cannot \
                    `apt-get install -y chromium`"
                .into(),
        );
    }
    eprintln!("browser test: chromium not found; installing it with apt-get (root)");
    if !apt_get(&["install", "-y", "-qq", "chromium"]) {
        // The package lists may be missing or stale on a fresh machine.
        apt_get(&["update", "-qq"]);
        apt_get(&["install", "-y", "-qq", "chromium"]);
    }
    find().ok_or_else(|| "`apt-get install -y chromium` did not provide a chromium binary".into())
}

/// Runs Chromium headless on `url` with `extra` flags; its stdout. Killed after 90 s.
fn chromium(binary: &Path, profile: &Path, extra: &[String], url: &str) -> String {
    let mut child = Command::new(binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() > Duration::from_secs(90) => {
                let _ = child.kill();
                panic!("chromium did not finish within 90 s on {url}");
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => panic!("waiting for chromium: {e}"),
        }
    }
    let output = child.wait_with_output().expect("chromium output");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Appended to a copy of the page: after load, writes what the browser sees into the DOM,
/// where --dump-dom shows it. The copy also loads every image eagerly (the page itself
/// loads charts lazily, as they scroll into view). `<\/script>` keeps the HTML parser from
/// ending the script inside the string.
const PROBE: &str = r#"<script>
window.addEventListener('load', () => {
  const images = [...document.images];
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src'));
  const wrong = images.filter(i => i.naturalWidth != i.getAttribute('width') || i.naturalHeight != i.getAttribute('height')).map(i => i.getAttribute('src'));
  const text = document.body.innerText;
  const facts = [
    'images=' + images.length,
    'broken=' + broken.length + ' ' + broken.join(','),
    'wrongsize=' + wrong.length + ' ' + wrong.join(','),
    'tables=' + document.querySelectorAll('table').length,
    'scripts=' + document.querySelectorAll('script').length,
    'hostile_as_text=' + text.includes('<script>alert(1)<\/script>"quotes"'),
    'kvm_faster=' + text.includes('kvm faster'),
  ];
  const out = document.createElement('pre');
  out.textContent = facts.map(f => 'hvbench-probe:' + f).join('\n');
  document.body.appendChild(out);
});
</script>"#;

fn fact<'a>(dom: &'a str, name: &str) -> &'a str {
    let prefix = format!("{PROBE_MARK}{name}=");
    dom.lines()
        .find_map(|l| l.find(&prefix).map(|at| l[at + prefix.len()..].trim_end()))
        .map(|value| value.trim_end_matches("</pre></body></html>"))
        .unwrap_or_else(|| panic!("the probe reported no {name}; DOM tail:\n{}", tail(dom)))
}

fn tail(text: &str) -> &str {
    let start = text.len().saturating_sub(2000);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    &text[start..]
}

#[test]
fn chromium_renders_the_report() {
    let required = std::env::var("HVBENCH_REQUIRE_BROWSER").is_ok_and(|v| v == "1");
    let binary = match find_chromium() {
        Ok(binary) => binary,
        Err(why) if required => panic!("HVBENCH_REQUIRE_BROWSER=1 but no browser: {why}"),
        Err(why) => {
            eprintln!(
                "NOTICE: browser test skipped: {why}. Install Debian's `chromium` or set \
                 HVBENCH_REQUIRE_BROWSER=1 to make this a failure."
            );
            return;
        }
    };

    let root = tempfile::tempdir().unwrap();
    let (kvm, xen) = common::two_backends(root.path());
    let out = root.path().join("report");
    let summary = render(&[kvm, xen], &out, &ReportOptions::default()).unwrap();
    let index = std::fs::read_to_string(&summary.index).unwrap();
    let probe_page = out.join("probe.html");
    std::fs::write(
        &probe_page,
        index
            .replace("loading=\"lazy\"", "loading=\"eager\"")
            .replace("</body>", &format!("{PROBE}\n</body>")),
    )
    .unwrap();

    let profile = tempfile::tempdir().unwrap();
    let dom = chromium(
        &binary,
        profile.path(),
        &["--dump-dom".into(), "--virtual-time-budget=10000".into()],
        &format!("file://{}", probe_page.display()),
    );
    let images: usize = fact(&dom, "images").parse().unwrap();
    let expected_images = summary
        .charts
        .iter()
        .filter(|c| c.format == reports::plot::ChartFormat::Png)
        .count();
    assert_eq!(images, expected_images, "every PNG chart is on the page");
    assert!(images >= 15);
    let count = |name: &str| fact(&dom, name).split_whitespace().next() == Some("0");
    assert!(count("broken"), "broken images: {}", fact(&dom, "broken"));
    assert!(
        count("wrongsize"),
        "images whose size differs from width/height: {}",
        fact(&dom, "wrongsize")
    );
    // Hosts, cpu, io, problems.
    let tables: usize = fact(&dom, "tables").parse().unwrap();
    assert_eq!(tables, 4);
    // Only the probe's own script: nothing from the records became a script element.
    assert_eq!(fact(&dom, "scripts"), "1");
    assert_eq!(fact(&dom, "hostile_as_text"), "true");
    assert_eq!(fact(&dom, "kvm_faster"), "true");

    // A screenshot of the page itself, kept under target/ for a person to look at.
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&shots).unwrap();
    let screenshot = shots.join("report.png");
    let _ = std::fs::remove_file(&screenshot);
    let profile = tempfile::tempdir().unwrap();
    chromium(
        &binary,
        profile.path(),
        &[
            format!("--screenshot={}", screenshot.display()),
            "--window-size=1280,2000".into(),
        ],
        &format!("file://{}", summary.index.display()),
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&screenshot).expect("chromium wrote the screenshot"),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    assert_eq!((frame.width, frame.height), (1280, 2000));
    // Not a blank page: text, table rules and warning colours give many distinct colours.
    let step = frame.color_type.samples();
    let colours: std::collections::BTreeSet<&[u8]> =
        pixels.chunks(step).map(|p| &p[..3.min(step)]).collect();
    assert!(
        colours.len() > 50,
        "the screenshot looks blank ({} colours)",
        colours.len()
    );
    eprintln!("browser test: screenshot at {}", screenshot.display());
}
