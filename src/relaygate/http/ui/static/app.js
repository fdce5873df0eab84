// relaygate web UI: the only script the pages load (CSP: script-src 'self').
// Text from messages is only ever set with textContent, never as HTML.
"use strict";

document.addEventListener("submit", (event) => {
  const message = event.target.dataset ? event.target.dataset.confirm : undefined;
  if (message && !window.confirm(message)) event.preventDefault();
});

function when(rfc3339) {
  return new Date(rfc3339).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

function size(n) {
  if (n < 1024) return n + " B";
  if (n < 1048576) return (n / 1024).toFixed(1) + " KiB";
  return (n / 1048576).toFixed(1) + " MiB";
}

function cut(text, n) {
  return text.length > n ? text.slice(0, n - 3) + "..." : text;
}

function cell(text, cls) {
  const td = document.createElement("td");
  if (cls) td.className = cls;
  td.textContent = text;
  return td;
}

function clipped(text) {
  const td = document.createElement("td");
  td.className = "addr";
  const span = document.createElement("span");
  span.className = "clip";
  span.title = text;
  span.textContent = text;
  td.appendChild(span);
  return td;
}

function statusCell(status) {
  const td = document.createElement("td");
  const span = document.createElement("span");
  span.className = "status s-" + status.replace(/[^a-z]+/g, "-");
  span.textContent = status;
  td.appendChild(span);
  return td;
}

function row(m) {
  const tr = document.createElement("tr");
  tr.dataset.id = m.id;
  tr.className = "new";
  tr.appendChild(cell(when(m.created_at), "nowrap"));
  tr.appendChild(clipped(m.mail_from || "<>"));
  tr.appendChild(clipped(cut(m.rcpt_to.join(", "), 200)));
  const subject = document.createElement("td");
  subject.className = "subject";
  const link = document.createElement("a");
  link.href = "/messages/" + encodeURIComponent(m.id);
  link.textContent = cut(m.subject || "(no subject)", 200);
  subject.appendChild(link);
  tr.appendChild(subject);
  tr.appendChild(clipped(m.account));
  tr.appendChild(statusCell(m.status));
  tr.appendChild(cell(size(m.size), "nowrap"));
  return tr;
}

function live(indicator) {
  const body = document.querySelector("#message-table tbody");
  if (!body) return;
  let failures = 0;
  async function poll() {
    try {
      const response = await fetch(indicator.dataset.poll, { credentials: "same-origin" });
      if (response.status === 401 || response.redirected) {
        indicator.textContent = "logged out";
        return;
      }
      const data = await response.json();
      failures = 0;
      indicator.className = "live on";
      const known = new Map();
      body.querySelectorAll("tr[data-id]").forEach((tr) => known.set(tr.dataset.id, tr));
      const fresh = [];
      for (const m of data.messages) {
        const old = known.get(m.id);
        if (old) {
          const span = old.querySelector(".status");
          if (span && span.textContent !== m.status) old.replaceWith(row(m));
        } else {
          fresh.push(row(m));
        }
      }
      if (fresh.length) {
        const empty = body.querySelector("tr.empty");
        if (empty) empty.remove();
        body.prepend(...fresh);
      }
    } catch (error) {
      failures += 1;
      indicator.className = "live off";
    }
    setTimeout(poll, Math.min(2000 * (1 + failures), 30000));
  }
  setTimeout(poll, 2000);
}

document.addEventListener("DOMContentLoaded", () => {
  const indicator = document.getElementById("live");
  if (indicator) live(indicator);
});
