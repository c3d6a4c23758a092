//! The eval report viewer: one self-contained HTML page per eval run (no network: styles, script and
//! charts inline), and an index of every run. At the top the gate's decision and its reasons; then
//! per suite the scores of the base, the incumbent and the candidate with the interval of the
//! difference; the history of every suite across nights (SVG); the training curves of the candidate;
//! sample generations side by side with the words that differ marked; and every item's result in a
//! table that sorts by any column and filters by text and suite (`#filter=…&suite=…` in the address
//! presets both).

use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::gate::{SuiteVerdict, Verdict};
use crate::run::EvalReport;

/// One earlier (or this) run, for the history chart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryPoint {
    pub run: String,
    pub candidate: String,
    pub promoted: bool,
    /// Suite → the candidate's mean score.
    pub scores: Vec<(String, f64)>,
}

/// One line of the candidate's training `metrics.jsonl`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainingPoint {
    pub step: usize,
    pub loss: f64,
    #[serde(default)]
    pub holdout_loss: Option<f64>,
}

/// What a page shows besides the report itself.
pub struct Page<'a> {
    pub run: &'a str,
    pub created: &'a str,
    pub report: &'a EvalReport,
    pub promoted: bool,
    pub history: &'a [HistoryPoint],
    pub training: &'a [TrainingPoint],
}

/// One run of the index.
pub struct IndexEntry {
    pub run: String,
    pub candidate: String,
    pub incumbent: String,
    pub promote: bool,
    pub promoted: bool,
}

const STYLE: &str = r#"
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d232b;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.muted{color:#667085}.card{background:#fff;border:1px solid #e4e7ec;border-radius:8px;padding:16px;margin:12px 0}
.decision{border-left:6px solid}.decision.promote{border-color:#12b76a}.decision.reject{border-color:#f04438}
.badge{display:inline-block;padding:2px 8px;border-radius:10px;font-weight:600;font-size:12px}
.pass{background:#d1fadf;color:#05603a}.fail{background:#fee4e2;color:#912018}.neutral{background:#eaecf0;color:#344054}
table{border-collapse:collapse;width:100%;background:#fff}th,td{padding:6px 8px;border-bottom:1px solid #eaecf0;text-align:left;vertical-align:top}
th{background:#f9fafb;font-weight:600;white-space:nowrap}th[data-sort]{cursor:pointer}th[data-sort]:hover{background:#eef2f6}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr.hidden{display:none}
.samples{display:grid;grid-template-columns:1fr 1fr;gap:8px}pre{white-space:pre-wrap;overflow-wrap:anywhere;margin:0;font:13px/1.4 ui-monospace,monospace}
ins{background:#d1fadf;text-decoration:none}del{background:#fee4e2}
.controls{display:flex;gap:8px;margin:8px 0}.controls input{flex:1;padding:6px}svg text{font-size:11px;fill:#475467}
"#;

const SCRIPT: &str = r#"
(function(){
  var table=document.getElementById('items');if(!table)return;
  var body=table.tBodies[0],filter=document.getElementById('filter'),suite=document.getElementById('suite');
  function apply(){
    var q=filter.value.toLowerCase(),s=suite.value,shown=0;
    Array.prototype.forEach.call(body.rows,function(r){
      var ok=(!s||r.dataset.suite===s)&&(!q||r.textContent.toLowerCase().indexOf(q)>=0);
      r.classList.toggle('hidden',!ok);if(ok)shown++;
    });
    document.getElementById('shown').textContent=shown;
  }
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,i){
    if(!th.dataset.sort)return;
    th.addEventListener('click',function(){
      var asc=th.dataset.dir!=='asc';th.dataset.dir=asc?'asc':'desc';
      var rows=Array.prototype.slice.call(body.rows),num=th.dataset.sort==='num';
      rows.sort(function(a,b){
        var x=a.cells[i].dataset.v||a.cells[i].textContent,y=b.cells[i].dataset.v||b.cells[i].textContent;
        var c=num?(parseFloat(x)||0)-(parseFloat(y)||0):x.localeCompare(y);return asc?c:-c;
      });
      rows.forEach(function(r){body.appendChild(r);});
    });
  });
  filter.addEventListener('input',apply);suite.addEventListener('change',apply);
  var h=new URLSearchParams(location.hash.slice(1));
  if(h.get('filter'))filter.value=h.get('filter');if(h.get('suite'))suite.value=h.get('suite');
  if(h.get('sort')){var th=table.tHead.rows[0].querySelector('[data-key="'+h.get('sort')+'"]');if(th)th.click();}
  apply();
})();
"#;

/// HTML-escaped text.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn verdict_badge(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => r#"<span class="badge pass">pass</span>"#,
        Verdict::Fail => r#"<span class="badge fail">fail</span>"#,
        Verdict::Neutral => r#"<span class="badge neutral">—</span>"#,
    }
}

fn mean(scores: &[crate::item::ItemResult]) -> Option<f64> {
    (!scores.is_empty()).then(|| scores.iter().map(|r| r.score).sum::<f64>() / scores.len() as f64)
}

fn num(v: Option<f64>) -> String {
    v.map_or("—".into(), |v| format!("{v:+.4}"))
}

/// The page of one eval run.
pub fn render(page: &Page<'_>) -> String {
    let r = page.report;
    let mut h = String::new();
    let title = format!("{} vs {}", r.candidate, r.incumbent);
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>pai eval: {}</title><style>{STYLE}</style></head><body><main>",
        escape(&title)
    );
    let _ = write!(
        h,
        "<p class=\"muted\"><a href=\"index.html\">all runs</a></p><h1>{}</h1><p class=\"muted\">run {} · {}</p>",
        escape(&title),
        escape(page.run),
        escape(page.created)
    );
    // 1. The decision.
    let (class, word) = match (r.decision.promote, page.promoted) {
        (true, true) => ("promote", "Promoted"),
        (true, false) => ("promote", "Passes the gate (not promoted)"),
        (false, _) => ("reject", "Rejected"),
    };
    let _ = write!(
        h,
        "<section id=\"decision\" class=\"card decision {class}\" data-promote=\"{}\"><h2 style=\"margin-top:0\">{word}</h2><ul>",
        r.decision.promote
    );
    for reason in &r.decision.reasons {
        let _ = write!(h, "<li>{}</li>", escape(reason));
    }
    h.push_str("</ul></section>");
    // 2. Suites.
    h.push_str("<h2>Suites</h2><table id=\"suites\"><thead><tr><th>suite</th><th>role</th><th>items</th><th>base</th><th>incumbent</th><th>candidate</th><th>delta</th><th>95% interval</th><th>detects</th><th></th><th>verdict</th></tr></thead><tbody>");
    for (results, verdict) in r.suites.iter().zip(&r.decision.suites) {
        suite_row(&mut h, results, verdict, r.incumbent == "base");
    }
    h.push_str("</tbody></table>");
    by_source(&mut h, r);
    h.push_str("<p class=\"muted\">Scores are higher-is-better: −(mean negative log-likelihood per token, nats) for text suites, accuracy for tasks. The interval is a cluster bootstrap over source files; \"detects\" is the smallest true difference the suite would find 80% of the time.</p>");
    // 3. History and training.
    h.push_str("<h2>History</h2><div class=\"card\">");
    h.push_str(&history_chart(page.history));
    h.push_str("</div><h2>Training</h2><div class=\"card\">");
    h.push_str(&training_chart(page.training));
    h.push_str("</div>");
    // 4. Samples.
    h.push_str("<h2>Sample generations</h2>");
    if r.samples.is_empty() {
        h.push_str("<p class=\"muted\">No samples in this run.</p>");
    }
    for s in &r.samples {
        let (inc, cand) = word_diff(&s.incumbent, &s.candidate);
        let _ = write!(
            h,
            "<div class=\"card sample\"><p><b>{}</b> <span class=\"muted\">prompt</span></p><pre>{}</pre><div class=\"samples\"><div><p class=\"muted\">incumbent ({})</p><pre>{inc}</pre></div><div><p class=\"muted\">candidate ({})</p><pre>{cand}</pre></div></div></div>",
            escape(&s.id),
            escape(&s.prompt),
            escape(&r.incumbent),
            escape(&r.candidate)
        );
    }
    // 5. Items.
    h.push_str("<h2>Items (<span id=\"shown\"></span> shown)</h2><div class=\"controls\"><input id=\"filter\" placeholder=\"filter by id or group\"><select id=\"suite\"><option value=\"\">all suites</option>");
    for s in &r.suites {
        let _ = write!(h, "<option>{}</option>", escape(&s.name));
    }
    h.push_str("</select></div><table id=\"items\"><thead><tr><th data-sort=\"text\" data-key=\"suite\">suite</th><th data-sort=\"text\" data-key=\"id\">item</th><th data-sort=\"text\" data-key=\"group\">group</th><th data-sort=\"num\" data-key=\"base\">base</th><th data-sort=\"num\" data-key=\"incumbent\">incumbent</th><th data-sort=\"num\" data-key=\"candidate\">candidate</th><th data-sort=\"num\" data-key=\"delta\">delta</th></tr></thead><tbody>");
    for s in &r.suites {
        for (k, (c, i)) in s.candidate.iter().zip(&s.incumbent).enumerate() {
            let base = if r.incumbent == "base" {
                Some(i.score)
            } else {
                s.base.get(k).map(|b| b.score)
            };
            let _ = write!(
                h,
                "<tr data-suite=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td class=\"num\" data-v=\"{}\">{}</td><td class=\"num\" data-v=\"{}\">{:+.4}</td><td class=\"num\" data-v=\"{}\">{:+.4}</td><td class=\"num\" data-v=\"{}\">{:+.4}</td></tr>",
                escape(&s.name),
                escape(&s.name),
                escape(&c.id),
                escape(&c.group),
                base.unwrap_or(f64::NAN),
                num(base),
                i.score,
                i.score,
                c.score,
                c.score,
                c.score - i.score,
                c.score - i.score
            );
        }
    }
    let _ = write!(
        h,
        "</tbody></table></main><script>{SCRIPT}</script></body></html>"
    );
    h
}

/// Suites whose items come from the owner's sources (groups `source:path`), broken down by source
/// (a source is notes or code, so this is also by kind).
fn by_source(h: &mut String, r: &EvalReport) {
    let mut rows = String::new();
    for s in &r.suites {
        let mut sources: Vec<(&str, Vec<usize>)> = Vec::new();
        for (k, item) in s.candidate.iter().enumerate() {
            let Some((source, _)) = item.group.split_once(':') else {
                continue;
            };
            match sources.iter_mut().find(|(n, _)| *n == source) {
                Some((_, ks)) => ks.push(k),
                None => sources.push((source, vec![k])),
            }
        }
        for (source, ks) in sources {
            let avg = |v: &[crate::item::ItemResult]| -> Option<f64> {
                let xs: Vec<f64> = ks
                    .iter()
                    .filter_map(|&k| v.get(k).map(|r| r.score))
                    .collect();
                (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
            };
            let (c, i) = (avg(&s.candidate), avg(&s.incumbent));
            let _ = write!(
                rows,
                "<tr data-source=\"{}\"><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                escape(source),
                escape(&s.name),
                escape(source),
                ks.len(),
                num(avg(if r.incumbent == "base" {
                    &s.incumbent
                } else {
                    &s.base
                })),
                num(i),
                num(c),
                num(c.zip(i).map(|(c, i)| c - i))
            );
        }
    }
    if !rows.is_empty() {
        let _ = write!(
            h,
            "<h2>By source</h2><table id=\"by-source\"><thead><tr><th>suite</th><th>source</th><th>items</th><th>base</th><th>incumbent</th><th>candidate</th><th>delta</th></tr></thead><tbody>{rows}</tbody></table>"
        );
    }
}

/// `incumbent_is_base`: the base's scores are the incumbent's.
fn suite_row(
    h: &mut String,
    results: &crate::run::SuiteResults,
    verdict: &SuiteVerdict,
    incumbent_is_base: bool,
) {
    let base = if incumbent_is_base {
        &results.incumbent
    } else {
        &results.base
    };
    let c = verdict.comparison.as_ref();
    let interval = c.map_or("—".into(), |c| {
        format!("[{:+.4}, {:+.4}]", c.interval.0, c.interval.1)
    });
    let _ = write!(
        h,
        "<tr data-suite=\"{}\" data-verdict=\"{:?}\"><td><b>{}</b><br><span class=\"muted\">{}</span></td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{interval}</td><td class=\"num\">{}</td><td>{}</td><td>{}<br><span class=\"muted\">{}</span></td></tr>",
        escape(&results.name),
        verdict.verdict,
        escape(&results.name),
        escape(&results.description),
        verdict.role.as_str(),
        c.map_or(0, |c| c.items),
        num(mean(base)),
        num(mean(&results.incumbent)),
        num(mean(&results.candidate)),
        num(c.map(|c| c.delta)),
        c.map_or("—".into(), |c| format!("±{:.4}", c.detectable)),
        c.map_or(String::new(), interval_svg),
        verdict_badge(verdict.verdict),
        escape(&verdict.reason)
    );
}

/// A small forest plot: the interval and the delta against zero.
fn interval_svg(c: &crate::gate::Comparison) -> String {
    let span = c.interval.0.abs().max(c.interval.1.abs()).max(1e-9) * 1.2;
    let x = |v: f64| 60.0 + v / span * 55.0;
    format!(
        "<svg class=\"interval\" width=\"120\" height=\"18\" viewBox=\"0 0 120 18\"><line x1=\"60\" y1=\"2\" x2=\"60\" y2=\"16\" stroke=\"#98a2b3\"/><line x1=\"{:.1}\" y1=\"9\" x2=\"{:.1}\" y2=\"9\" stroke=\"#1d232b\" stroke-width=\"2\"/><circle cx=\"{:.1}\" cy=\"9\" r=\"3\" fill=\"#1d232b\"/></svg>",
        x(c.interval.0),
        x(c.interval.1),
        x(c.delta)
    )
}

const COLOURS: [&str; 6] = [
    "#2e90fa", "#f79009", "#12b76a", "#9e77ed", "#f04438", "#475467",
];

/// Lines of (x, y) series in a box, with min/max labels.
fn line_chart(id: &str, series: &[(String, Vec<(f64, f64)>)], x_label: &str) -> String {
    let points: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    if points.is_empty() {
        return format!("<svg id=\"{id}\" width=\"0\" height=\"0\"></svg><p class=\"muted\">Nothing to draw yet.</p>");
    }
    let (w, hgt, pad) = (1000.0, 220.0, 40.0);
    let (x0, x1) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let (xs, ys) = ((x1 - x0).max(1e-9), (y1 - y0).max(1e-9));
    let px = |x: f64| pad + (x - x0) / xs * (w - 2.0 * pad);
    let py = |y: f64| hgt - pad - (y - y0) / ys * (hgt - 2.0 * pad);
    let mut s = format!(
        "<svg id=\"{id}\" viewBox=\"0 0 {w} {hgt}\" width=\"100%\" role=\"img\"><rect x=\"{pad}\" y=\"{pad}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#eaecf0\"/><text x=\"2\" y=\"{}\">{y1:.3}</text><text x=\"2\" y=\"{}\">{y0:.3}</text><text x=\"{}\" y=\"{}\">{}</text>",
        w - 2.0 * pad,
        hgt - 2.0 * pad,
        pad + 4.0,
        hgt - pad,
        w / 2.0,
        hgt - 8.0,
        escape(x_label)
    );
    for (k, (name, pts)) in series.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = write!(
            s,
            "<polyline class=\"series\" data-name=\"{}\" points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"/>",
            escape(name),
            path.join(" ")
        );
        for &(x, y) in pts {
            let _ = write!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"/>",
                px(x),
                py(y)
            );
        }
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" fill=\"{colour}\" style=\"fill:{colour}\">{}</text>",
            pad + 10.0 + 160.0 * k as f64,
            pad - 8.0,
            escape(name)
        );
    }
    s.push_str("</svg>");
    s
}

fn history_chart(history: &[HistoryPoint]) -> String {
    let mut names: Vec<String> = Vec::new();
    for p in history {
        for (n, _) in &p.scores {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    let series: Vec<(String, Vec<(f64, f64)>)> = names
        .iter()
        .map(|n| {
            let pts = history
                .iter()
                .enumerate()
                .filter_map(|(i, p)| {
                    p.scores
                        .iter()
                        .find(|(m, _)| m == n)
                        .map(|(_, v)| (i as f64, *v))
                })
                .collect();
            (n.clone(), pts)
        })
        .collect();
    let mut s = line_chart(
        "history",
        &series,
        "eval runs, oldest first (candidate's mean score per suite)",
    );
    s.push_str("<p class=\"muted\">");
    for p in history {
        let _ = write!(
            s,
            "{}{} · ",
            escape(&p.candidate),
            if p.promoted { " (promoted)" } else { "" }
        );
    }
    s.push_str("</p>");
    s
}

fn training_chart(points: &[TrainingPoint]) -> String {
    let loss: Vec<(f64, f64)> = points.iter().map(|p| (p.step as f64, p.loss)).collect();
    let holdout: Vec<(f64, f64)> = points
        .iter()
        .filter_map(|p| p.holdout_loss.map(|h| (p.step as f64, h)))
        .collect();
    line_chart(
        "training",
        &[
            ("train loss".into(), loss),
            ("holdout loss".into(), holdout),
        ],
        "training step",
    )
}

/// Both texts with the words the other lacks marked (`<del>` in the first, `<ins>` in the second),
/// by a longest common subsequence of words.
pub fn word_diff(a: &str, b: &str) -> (String, String) {
    let (wa, wb): (Vec<&str>, Vec<&str>) = (
        a.split_inclusive(' ').collect(),
        b.split_inclusive(' ').collect(),
    );
    let (n, m) = (wa.len(), wb.len());
    if n * m > 4_000_000 {
        return (escape(a), escape(b));
    }
    // Words compare without the space after them.
    let same = |i: usize, j: usize| wa[i].trim_end() == wb[j].trim_end();
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if same(i, j) {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let (mut out_a, mut out_b) = (String::new(), String::new());
    while i < n || j < m {
        if i < n && j < m && same(i, j) {
            out_a.push_str(&escape(wa[i]));
            out_b.push_str(&escape(wb[j]));
            i += 1;
            j += 1;
        } else if j < m && (i == n || lcs[i][j + 1] >= lcs[i + 1][j]) {
            let _ = write!(out_b, "<ins>{}</ins>", escape(wb[j]));
            j += 1;
        } else {
            let _ = write!(out_a, "<del>{}</del>", escape(wa[i]));
            i += 1;
        }
    }
    (out_a, out_b)
}

/// The index of every run, newest first.
pub fn render_index(entries: &[IndexEntry]) -> String {
    let mut h = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>pai eval reports</title><style>{STYLE}</style></head><body><main><h1>pai eval reports</h1><table id=\"runs\"><thead><tr><th>run</th><th>candidate</th><th>incumbent</th><th>decision</th></tr></thead><tbody>"
    );
    for e in entries {
        let decision = match (e.promote, e.promoted) {
            (true, true) => r#"<span class="badge pass">promoted</span>"#,
            (true, false) => r#"<span class="badge pass">passes</span>"#,
            (false, _) => r#"<span class="badge fail">rejected</span>"#,
        };
        let _ = write!(
            h,
            "<tr><td><a href=\"{}.html\">{}</a></td><td>{}</td><td>{}</td><td>{decision}</td></tr>",
            escape(&e.run),
            escape(&e.run),
            escape(&e.candidate),
            escape(&e.incumbent)
        );
    }
    h.push_str("</tbody></table></main></body></html>");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_that_differ_are_marked_and_text_is_escaped() {
        let (a, b) = word_diff("the heron waits <here>", "the egret waits <here> today");
        assert_eq!(a, "the <del>heron </del>waits &lt;here&gt;");
        assert_eq!(
            b,
            "the <ins>egret </ins>waits &lt;here&gt; <ins>today</ins>"
        );
        assert_eq!(escape("a&b\"'"), "a&amp;b&quot;&#39;");
    }
}
