"""`/docs`: the API reference rendered in the browser from /v1/openapi.json, with nothing loaded
from the internet (FastAPI's Swagger UI comes from a CDN; hosts often have no internet)."""

DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>waport API</title>
<style>
body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:60rem;padding:1rem;color:#1b1f24}
h1{font-size:1.5rem}h2{font-size:1.1rem;margin:1.6rem 0 .4rem}code,pre{font-family:ui-monospace,monospace}
.op{border:1px solid #d0d7de;border-radius:6px;padding:.6rem .8rem;margin:.5rem 0}
.m{display:inline-block;min-width:4.2rem;font-weight:600}.GET{color:#0969da}.POST{color:#1a7f37}
.PUT{color:#9a6700}.DELETE{color:#cf222e}.lock{color:#57606a;font-size:.85rem}
pre{background:#f6f8fa;padding:.5rem;overflow:auto;font-size:.85rem}
</style></head><body>
<h1>waport HTTP API</h1>
<p id="intro">Loading <a href="/v1/openapi.json">/v1/openapi.json</a>&hellip;</p>
<div id="ops"></div>
<script>
fetch("/v1/openapi.json").then(r => r.json()).then(doc => {
  const esc = s => String(s ?? "").replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;","\\"":"&quot;"}[c]));
  document.getElementById("intro").innerHTML = esc(doc.info.description || "") +
    " <a href=\\"/v1/openapi.json\\">OpenAPI document</a>.";
  let html = "";
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(item)) {
      const m = method.toUpperCase();
      const params = (op.parameters || []).map(p => `<code>${esc(p.name)}</code> (${esc(p.in)})`).join(", ");
      const content = (op.requestBody && op.requestBody.content) || {};
      const schema = (content["application/json"] || Object.values(content)[0] || {}).schema;
      const body = schema ? `<pre>${esc(JSON.stringify(schema, null, 1))}</pre>` : "";
      const answers = Object.entries(op.responses || {})
        .map(([s, r]) => `<code>${esc(s)}</code> ${esc(r.description)}`).join("; ");
      html += `<div class="op"><span class="m ${m}">${m}</span><code>${esc(path)}</code>
        ${op.security && op.security.length ? '<span class="lock">bearer token</span>' : ""}
        <div>${esc(op.summary)}</div>${params ? `<div>Parameters: ${params}</div>` : ""}${body}
        <div>Answers: ${answers}</div></div>`;
    }
  }
  document.getElementById("ops").innerHTML = html;
});
</script></body></html>
"""
