//! HTML of the dashboard: escaping, the page frame, sections, tables and
//! the server-rendered SVG bar chart. No script anywhere; every text that
//! came from the vault goes through [`esc`].

use std::fmt::Write as _;

/// The stylesheet, served at `/ui/style.css` (the CSP allows styles from
/// the dashboard's own origin only, so no inline `style` attribute).
pub const STYLE: &str = "\
body{font-family:system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2430}\
header{background:#1d2430;color:#fff;padding:.6rem 1.2rem;display:flex;align-items:center;gap:1.5rem}\
header a{color:#fff;text-decoration:none;font-weight:600}\
header form{margin-left:auto}\
main{padding:1rem 1.2rem;max-width:1100px}\
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:.8rem 1rem;margin:0 0 1rem}\
h1{font-size:1.3rem}h2{font-size:1.05rem;margin:.2rem 0 .6rem}\
.cards{display:flex;flex-wrap:wrap;gap:.6rem;margin-bottom:1rem}\
.card{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:.5rem .8rem;min-width:9rem}\
.card .n{font-size:1.6rem;font-weight:700;display:block}\
.card.warn .n{color:#b3261e}\
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:.2rem .5rem;border-bottom:1px solid #eef0f3}\
.muted{color:#667085}.error{color:#b3261e}\
input[type=password]{width:28rem;max-width:90%;padding:.3rem}\
button{padding:.3rem .8rem}\
";

/// `text` escaped for HTML text and quoted attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM UTC`; 0 is "never".
pub fn when(ms: u64) -> String {
    if ms == 0 {
        return "never".into();
    }
    chrono::DateTime::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX))
        .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_else(|| "?".into())
}

/// A whole page: title, the signed-in header (with the sign-out form) when
/// `signed_in`, and `body`.
pub fn frame(title: &str, signed_in: bool, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 1024);
    out.push_str("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">");
    out.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">");
    out.push_str("<meta name=\"referrer\" content=\"same-origin\">");
    let _ = write!(out, "<title>{} · keyward</title>", esc(title));
    out.push_str("<link rel=\"stylesheet\" href=\"/ui/style.css\"></head><body><header>");
    out.push_str("<a href=\"/ui/\">keyward governance</a>");
    if signed_in {
        out.push_str(
            "<form method=\"post\" action=\"/ui/sign-out\">\
             <button type=\"submit\" data-testid=\"sign-out\">Sign out</button></form>",
        );
    }
    out.push_str("</header><main>");
    out.push_str(body);
    out.push_str("</main></body></html>");
    out
}

/// The sign-in form. `message` (already plain text) is shown above it.
pub fn sign_in(message: Option<&str>) -> String {
    let mut body = String::from("<h1>Sign in</h1><section>");
    if let Some(m) = message {
        let _ = write!(
            body,
            "<p class=\"error\" data-testid=\"sign-in-error\">{}</p>",
            esc(m)
        );
    }
    body.push_str(
        "<p>Paste a keyward token. It is sent once, in the body of this form, and kept \
         on the server for the session; the browser holds only a session cookie.</p>\
         <form method=\"post\" action=\"/ui/sign-in\" autocomplete=\"off\">\
         <label>Token <input type=\"password\" name=\"token\" id=\"token\" \
         data-testid=\"token\" autocomplete=\"off\" required></label> \
         <button type=\"submit\" data-testid=\"sign-in\">Sign in</button></form></section>",
    );
    frame("Sign in", false, &body)
}

/// A page that says why it shows nothing.
pub fn problem(title: &str, message: &str, signed_in: bool) -> String {
    frame(
        title,
        signed_in,
        &format!(
            "<h1>{}</h1><section><p class=\"error\" data-testid=\"problem\">{}</p></section>",
            esc(title),
            esc(message)
        ),
    )
}

/// A count card with `data-testid=testid`; `warn` when a non-zero count is
/// a finding.
pub fn card(out: &mut String, label: &str, testid: &str, count: u64, warn: bool) {
    let class = if warn && count > 0 {
        "card warn"
    } else {
        "card"
    };
    let _ = write!(
        out,
        "<div class=\"{class}\"><span class=\"n\" data-testid=\"{testid}\">{count}</span>{}</div>",
        esc(label)
    );
}

/// A section with a heading and `inner`.
pub fn section(out: &mut String, title: &str, testid: &str, inner: &str) {
    let _ = write!(
        out,
        "<section data-testid=\"{testid}\"><h2>{}</h2>{inner}</section>",
        esc(title)
    );
}

/// A link to an identity's page.
pub fn identity_link(name: &str) -> String {
    format!(
        "<a href=\"/ui/identity/{0}\" data-testid=\"identity-link\">{0}</a>",
        esc(name)
    )
}

/// A table of rows of already-escaped cells, or `empty` if none.
pub fn table(headers: &[&str], rows: &[Vec<String>], empty: &str) -> String {
    if rows.is_empty() {
        return format!("<p class=\"muted\">{}</p>", esc(empty));
    }
    let mut out = String::from("<table><thead><tr>");
    for h in headers {
        let _ = write!(out, "<th>{}</th>", esc(h));
    }
    out.push_str("</tr></thead><tbody>");
    for row in rows {
        out.push_str("<tr>");
        for cell in row {
            let _ = write!(out, "<td>{cell}</td>");
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
    out
}

/// A horizontal bar chart of `(label, count)` as inline SVG, each bar with
/// `data-testid="{testid}-bar"`, `data-label` and `data-count`.
pub fn bar_chart(title: &str, testid: &str, bars: &[(String, u64)]) -> String {
    const ROW: u64 = 24;
    const LABEL_W: u64 = 170;
    const BAR_W: u64 = 360;
    let max = bars.iter().map(|(_, n)| *n).max().unwrap_or(0).max(1);
    let height = ROW * (bars.len() as u64).max(1) + 8;
    let width = LABEL_W + BAR_W + 60;
    let mut out = String::new();
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" role=\"img\" data-testid=\"{testid}\" \
         aria-label=\"{}\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\">",
        esc(title)
    );
    let _ = write!(out, "<title>{}</title>", esc(title));
    for (i, (label, count)) in bars.iter().enumerate() {
        let y = ROW * i as u64 + 4;
        let w = if *count == 0 {
            0
        } else {
            (BAR_W * count / max).max(2)
        };
        let shown: String = label.chars().take(24).collect();
        let _ = write!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" font-size=\"12\" fill=\"#1d2430\">{}</text>",
            LABEL_W - 6,
            y + 14,
            esc(&shown)
        );
        let _ = write!(
            out,
            "<rect data-testid=\"{testid}-bar\" data-label=\"{}\" data-count=\"{count}\" \
             x=\"{LABEL_W}\" y=\"{y}\" width=\"{w}\" height=\"{}\" fill=\"#3b6fd8\"></rect>",
            esc(label),
            ROW - 6
        );
        let _ = write!(
            out,
            "<text x=\"{}\" y=\"{}\" font-size=\"12\" fill=\"#1d2430\">{count}</text>",
            LABEL_W + w + 6,
            y + 14
        );
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            esc("<script>\"a\"&'b'</script>"),
            "&lt;script&gt;&quot;a&quot;&amp;&#39;b&#39;&lt;/script&gt;"
        );
    }

    #[test]
    fn the_chart_carries_each_bar_and_escapes_labels() {
        let svg = bar_chart(
            "by kind",
            "kinds",
            &[("bot".into(), 3), ("<x>".into(), 0), ("ci".into(), 6)],
        );
        assert_eq!(svg.matches("data-testid=\"kinds-bar\"").count(), 3);
        assert!(svg.contains("data-label=\"&lt;x&gt;\" data-count=\"0\""));
        assert!(
            svg.contains("width=\"360\""),
            "the largest bar is full width"
        );
        assert!(!svg.contains("<x>"));
    }

    #[test]
    fn pages_have_no_script() {
        let page = sign_in(Some("no <b>"));
        assert!(!page.contains("<script"));
        assert!(page.contains("no &lt;b&gt;"));
        assert!(page.contains("method=\"post\" action=\"/ui/sign-in\""));
    }
}
