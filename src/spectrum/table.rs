//! The terminal tables of a [`SpectrumReport`]: one for singular values, one for singular
//! vectors, each with a row per (module type, layer) and a mean row per module type.

use std::fmt::Write;

use super::{SpectrumReport, SummaryRow};

fn f5(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.5}")
    } else {
        "-".into()
    }
}

fn sci(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2e}")
    } else {
        "-".into()
    }
}

fn pct(x: f64) -> String {
    if x.is_finite() {
        format!("{:.1}%", 100.0 * x)
    } else {
        "-".into()
    }
}

/// (module, layer column): the layer, `mean/N` for a module-type mean, `noise` for the control.
fn label(r: &SummaryRow, control: bool) -> (String, String) {
    match (r.layer, control) {
        (_, true) => (r.module.clone(), "noise".into()),
        (Some(l), _) => (r.module.clone(), l.to_string()),
        (None, _) => (r.module.clone(), format!("mean/{}", r.count)),
    }
}

fn values_line(r: &SummaryRow, control: bool) -> String {
    let (m, l) = label(r, control);
    format!(
        "{m:<10} {l:>7}  {:>9}  {:>8} {:>8} {:>8} {:>8}  {:>7} {:>6}",
        sci(r.rel_delta),
        f5(r.rho1),
        f5(r.rho.top),
        f5(r.rho.mid),
        f5(r.rho.bottom),
        pct(r.delta_top_share),
        pct(r.delta_top_share_random)
    )
}

fn vectors_line(r: &SummaryRow, control: bool) -> String {
    let (m, l) = label(r, control);
    format!(
        "{m:<10} {l:>7}  {:>8} {:>8} {:>8} {:>8}  {:>8} {:>8} {:>8}  {:>8} {:>8} {:>8}  {:>5}",
        f5(r.align_u1),
        f5(r.align_v1),
        f5(r.align_u_top),
        f5(r.align_v_top),
        f5(r.cos_u.top),
        f5(r.cos_u.mid),
        f5(r.cos_u.bottom),
        f5(r.cos_v.top),
        f5(r.cos_v.mid),
        f5(r.cos_v.bottom),
        r.intruders
    )
}

/// The two tables as text. `brief` prints only the per-module-type mean rows.
pub fn render_table(report: &SpectrumReport, brief: bool) -> String {
    let mut out = String::new();
    let ks: Vec<usize> = report.matrices.iter().map(|m| m.stats.k).collect();
    let (kmin, kmax) = (ks.iter().min().copied().unwrap_or(0), ks.iter().max().copied().unwrap_or(0));
    let k = if kmin == kmax { format!("k = {kmin}") } else { format!("k = {kmin}..{kmax} (per matrix)") };
    let _ = writeln!(
        out,
        "spectrum of {} → {} ({}): {} matrices, {k}; blocks: top = σ_1..σ_k, mid = the middle k, bot = the last k",
        report.base,
        report.tuned.as_deref().or(report.adapter.as_deref()).unwrap_or("?"),
        report.method,
        report.matrices.len()
    );
    if !report.unchanged.is_empty() {
        let _ = writeln!(out, "{} linears are unchanged and skipped", report.unchanged.len());
    }
    let groups: Vec<(&SummaryRow, Vec<SummaryRow>, Option<&SummaryRow>)> = report
        .summary
        .iter()
        .map(|s| {
            let rows = report.matrices.iter().filter(|m| m.module == s.module).map(|m| m.row()).collect();
            (s, rows, report.summary_control.iter().find(|c| c.module == s.module))
        })
        .collect();
    if !report.summary_control.is_empty() {
        let _ = writeln!(out, "noise rows: the same analysis of W0 + G, G Gaussian with ‖G‖_F = ‖ΔW‖_F per matrix (an unstructured change of the same size)");
    }
    let table = |out: &mut String, head: &str, line: &dyn Fn(&SummaryRow, bool) -> String| {
        let _ = writeln!(out, "\n{head}");
        let width = head.lines().last().map(|l| l.chars().count()).unwrap_or(80);
        let rule = "-".repeat(width);
        let _ = writeln!(out, "{rule}");
        for (s, rows, control) in &groups {
            if !brief {
                for r in rows {
                    let _ = writeln!(out, "{}", line(r, false));
                }
            }
            let _ = writeln!(out, "{}", line(s, false));
            if let Some(c) = control {
                let _ = writeln!(out, "{}", line(c, true));
            }
            if !brief {
                let _ = writeln!(out, "{rule}");
            }
        }
    };
    table(
        &mut out,
        &format!(
            "singular values: ρ_i = σ_i(W')/σ_i(W0); ΔW∈top = share of ‖ΔW‖² inside the top-k singular block of W0 (rand: k²/(m·n), a random ΔW's share)\n{:<10} {:>7}  {:>9}  {:>8} {:>8} {:>8} {:>8}  {:>7} {:>6}",
            "module", "layer", "‖ΔW‖/‖W‖", "ρ_1", "ρ̄ top", "ρ̄ mid", "ρ̄ bot", "ΔW∈top", "rand"
        ),
        &values_line,
    );
    table(
        &mut out,
        &format!(
            "singular vectors: matched |⟨u_i,u'_i⟩|, |⟨v_i,v'_i⟩|; principal-angle cosines (mean) per block; intr = intruders (best |cos| < {})\n{:<10} {:>7}  {:>8} {:>8} {:>8} {:>8}  {:>8} {:>8} {:>8}  {:>8} {:>8} {:>8}  {:>5}",
            report.intruder_threshold,
            "module",
            "layer",
            "|u1·u1'|",
            "|v1·v1'|",
            "ū top",
            "v̄ top",
            "cosU top",
            "mid",
            "bot",
            "cosV top",
            "mid",
            "bot",
            "intr"
        ),
        &vectors_line,
    );
    out
}
