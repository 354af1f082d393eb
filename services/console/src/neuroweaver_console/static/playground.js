// Playground: one or two panes, each a conversation with a deployment. Send posts the conversation to the console,
// which calls the model server's GenerateStream and forwards the chunks as server-sent events; the answer grows
// token by token. Both panes stream at once. Stop (or leaving the page) aborts the request, which cancels the call.
(function () {
  "use strict";
  const form = document.getElementById("chat-form");
  if (!form) return;  // no deployments
  const message = document.getElementById("message");
  const send = document.getElementById("send");
  const stop = document.getElementById("stop");
  const panes = ["a", "b"].map(function (key) {
    const el = document.getElementById("pane-" + key);
    return {
      el: el, select: document.getElementById("deployment-" + key), heading: el.querySelector("h2"),
      list: el.querySelector(".transcript"), status: el.querySelector(".pane-status"),
      deployment: "", history: [], controller: null,
    };
  });

  function clear(p) {
    if (p.controller) p.controller.abort();
    p.history = [];
    p.list.replaceChildren();
    p.status.textContent = "";
    p.el.dataset.state = "idle";
  }

  // The panes follow the pickers; another deployment starts another conversation. The URL keeps the choice.
  function sync() {
    for (const p of panes) {
      const id = p.select.value;
      if (id !== p.deployment) clear(p);
      p.deployment = id;
      p.el.hidden = !id;
      p.heading.textContent = id;
      p.list.setAttribute("aria-label", "conversation with " + (id || "the second deployment"));
    }
    const query = new URLSearchParams({ a: panes[0].deployment });
    if (panes[1].deployment) query.set("b", panes[1].deployment);
    history.replaceState(null, "", "?" + query.toString());
  }

  function addMessage(p, role, text) {
    const li = document.createElement("li");
    li.className = "msg msg-" + role;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : p.deployment;
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    li.append(who, body);
    p.list.append(li);
    return body;
  }

  // One server-sent event frame ("event: x\ndata: {...}"); comments (keepalives) give null.
  function parseFrame(frame) {
    let event = "message";
    const data = [];
    for (const line of frame.split("\n")) {
      if (line.startsWith("event:")) event = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
    return data.length ? { event: event, data: JSON.parse(data.join("\n")) } : null;
  }

  function describe(err) {
    return err.code ? err.code + (err.reason ? " " + err.reason : "") + (err.message ? ": " + err.message : "") : String(err.message || err);
  }

  async function ask(p, text, settings) {
    p.history.push({ role: "user", content: text });
    addMessage(p, "user", text);
    const body = addMessage(p, "assistant", "");
    let answer = "";
    let chunks = 0;
    let finished = null;
    p.controller = new AbortController();
    p.el.dataset.state = "streaming";
    p.el.dataset.chunks = "0";
    p.el.dataset.started = String(performance.now());
    p.list.setAttribute("aria-busy", "true");
    p.status.textContent = "Generating…";
    try {
      const response = await fetch("/playground/stream", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
        body: JSON.stringify({ deployment: p.deployment, messages: p.history, max_tokens: settings.maxTokens,
                               temperature: settings.temperature }),
        signal: p.controller.signal,
      });
      if (!response.ok) {
        const detail = await response.json().catch(function () { return { code: "HTTP " + response.status }; });
        throw detail;
      }
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const ev = parseFrame(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
          if (!ev) continue;
          if (ev.event === "token") {
            answer += ev.data.text;
            body.textContent = answer;
            chunks += 1;
            p.el.dataset.chunks = String(chunks);
            if (chunks === 1) p.el.dataset.firstChunk = String(performance.now());
          } else if (ev.event === "done") {
            finished = ev.data;
          } else if (ev.event === "failure") {
            throw ev.data;
          }
        }
      }
      if (!finished) throw { code: "UNAVAILABLE", message: "the stream ended before the answer did" };
      p.history.push({ role: "assistant", content: answer });
      p.status.textContent = finished.completion_tokens + " tokens (" + finished.finish_reason + ") · first token " +
        finished.first_token_ms + " ms · " + finished.latency_ms + " ms in all · " + finished.version;
      p.el.dataset.state = "done";
    } catch (err) {
      if (p.controller && p.controller.signal.aborted) {
        p.history.push({ role: "assistant", content: answer });  // what was shown stays in the conversation
        p.status.textContent = "Stopped.";
        p.el.dataset.state = "stopped";
      } else {
        p.history.pop();  // the turn failed: it is not part of the conversation
        body.parentElement.classList.add("msg-failed");
        if (!answer) body.textContent = "(no answer)";
        p.status.textContent = "Failed: " + describe(err) + ". This turn is not kept in the conversation.";
        p.el.dataset.state = "failed";
      }
    } finally {
      p.controller = null;
      p.el.dataset.finished = String(performance.now());
      p.list.removeAttribute("aria-busy");
      p.list.scrollTop = p.list.scrollHeight;
    }
  }

  form.addEventListener("submit", async function (e) {
    e.preventDefault();
    const text = message.value;
    if (!text.trim()) return;
    const settings = {
      maxTokens: parseInt(document.getElementById("max-tokens").value, 10),
      temperature: parseFloat(document.getElementById("temperature").value),
    };
    message.value = "";
    send.disabled = true;
    stop.disabled = false;
    await Promise.all(panes.filter(function (p) { return p.deployment; }).map(function (p) { return ask(p, text, settings); }));
    send.disabled = false;
    stop.disabled = true;
    message.focus();
  });
  stop.addEventListener("click", function () {
    for (const p of panes) if (p.controller) p.controller.abort();
  });
  document.getElementById("clear").addEventListener("click", function () { panes.forEach(clear); });
  message.addEventListener("keydown", function (e) {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      form.requestSubmit();
    }
  });
  for (const p of panes) p.select.addEventListener("change", sync);
  sync();
})();
