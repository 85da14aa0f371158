// Showing one choice: its text as it streams, each token a span coloured by its probability, and the
// tooltip with a token's log-probability and its top alternatives.
//
// The text is the truth: the server's `text_offset` says where each token starts (in code points, as
// Python counts, from the prompt's start), so a token's span is the text from its offset to the next token's.
// The spans then join to exactly the returned text, even where a token is half a UTF-8 character or a
// stop sequence cut into the last one.

const BIN_EDGES = [0.1, 0.3, 0.5, 0.7, 0.9];   // bin b holds probabilities in [edge b-1, edge b)
const CONTEXT_CHARS = 240;                      // how much prompt and suffix an insertion is shown between

/** 0 (below 10%) to 5 (90% or more); "none" where there is no log-probability (the first prompt token). */
export function probabilityBin(logprob) {
  if (logprob === null || logprob === undefined) return "none";
  const p = Math.exp(logprob);
  let bin = 0;
  while (bin < BIN_EDGES.length && p >= BIN_EDGES[bin]) bin += 1;
  return String(bin);
}

/** A token's text with its invisible characters made visible. */
export function visible(piece) {
  if (piece === "") return "(empty)";
  return piece.replace(/ /g, "␣").replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/\r/g, "␍");
}

export function formatLogprob(logprob) {
  return logprob.toFixed(4);
}

export function formatProbability(logprob) {
  const p = Math.exp(logprob) * 100;
  if (p >= 99.995) return "100%";
  return p >= 0.01 ? `${p.toFixed(2)}%` : `${p.toExponential(1)}%`;
}

function el(tag, attrs = {}, text = undefined) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

export class ChoiceView {
  /** @param context {prompt, suffix, echo}: what was sent, to tell prompt tokens and show an insertion. */
  constructor(parent, index, context, tooltip) {
    this.index = index;
    this.context = context;
    this.tooltip = tooltip;
    this.promptLength = Array.from(context.prompt).length;
    // text_offset counts from the prompt's start, echoed or not: without echo the text begins after it.
    this.base = context.echo ? 0 : this.promptLength;
    this.cps = [];        // the choice's text so far, one code point each
    this.tokens = [];     // {offset, logprob, top, piece, prompt}
    this.spans = [];
    this.withTokens = null;
    this.card = el("article", { class: "choice", "data-index": String(index), "aria-label": `Choice ${index}` });
    const head = el("header");
    head.append(el("h3", {}, `Choice ${index}`));
    this.finishNote = el("span", { class: "finish", "data-finish": "" });
    head.append(this.finishNote);
    this.card.append(head);
    this.text = el("div", { class: "text" });
    if (context.suffix && !context.echo) this.text.append(this.contextSpan(context.prompt, "prefix"));
    this.completion = el("span", { class: "completion" });
    this.lead = document.createTextNode("");
    this.completion.append(this.lead);
    this.text.append(this.completion);
    this.marker = el("span", { class: "end-marker", hidden: "" });
    this.text.append(this.marker);
    if (context.suffix) this.text.append(this.contextSpan(context.suffix, "suffix"));
    this.card.append(this.text);
    this.completion.addEventListener("keydown", (e) => this.onKey(e));
    parent.append(this.card);
  }

  contextSpan(text, where) {
    const cps = Array.from(text);
    const shown = where === "prefix"
      ? (cps.length > CONTEXT_CHARS ? "…" : "") + cps.slice(-CONTEXT_CHARS).join("")
      : cps.slice(0, CONTEXT_CHARS).join("") + (cps.length > CONTEXT_CHARS ? "…" : "");
    return el("span", { class: `context ${where}`, title: where === "prefix" ? "prompt" : "suffix" }, shown);
  }

  /** Take one choice object (of a stream chunk or a whole response) and show what it adds. */
  add(choice) {
    for (const cp of choice.text) this.cps.push(cp);
    const lp = choice.logprobs;
    if (this.withTokens === null) this.withTokens = Boolean(lp);
    if (lp) {
      for (let i = 0; i < lp.tokens.length; i += 1) {
        const offset = lp.text_offset[i] - this.base;
        this.tokens.push({ offset, logprob: lp.token_logprobs[i], top: lp.top_logprobs[i] || null,
          piece: lp.tokens[i], prompt: this.context.echo && offset < this.promptLength });
      }
    }
    this.render();
    if (choice.finish_reason) this.finish(choice.finish_reason);
  }

  get textSoFar() {
    return this.cps.join("");
  }

  slice(start, end) {
    return this.cps.slice(start, end).join("");
  }

  render() {
    if (!this.withTokens || this.tokens.length === 0) {
      this.renderPlain();
      return;
    }
    this.lead.data = this.slice(0, this.tokens[0].offset);
    // The last span drawn may have grown: redraw from it on.
    for (let i = Math.max(0, this.spans.length - 1); i < this.tokens.length; i += 1) {
      const end = i + 1 < this.tokens.length ? this.tokens[i + 1].offset : this.cps.length;
      const span = this.spans[i] || this.newSpan(i);
      span.textContent = this.slice(this.tokens[i].offset, end);
    }
  }

  renderPlain() {
    if (this.context.echo && !this.echoed) {
      this.echoed = el("span", { class: "echoed", title: "prompt (echo)" });
      this.completion.insertBefore(this.echoed, this.lead);
    }
    if (this.echoed) {
      this.echoed.textContent = this.slice(0, this.promptLength);
      this.lead.data = this.slice(this.promptLength);
    } else {
      this.lead.data = this.textSoFar;
    }
  }

  newSpan(i) {
    const token = this.tokens[i];
    const span = el("span", { class: token.prompt ? "tok prompt" : "tok", "data-i": String(i),
      "data-bin": probabilityBin(token.logprob), tabindex: this.spans.length === 0 ? "0" : "-1" });
    if (token.logprob !== null) span.dataset.logprob = String(token.logprob);
    if (token.piece.includes("\n")) span.dataset.newline = "";
    const show = () => this.tooltip.show(span, token);
    span.addEventListener("mouseenter", show);
    span.addEventListener("focus", () => {
      this.rove(span);
      show();
    });
    span.addEventListener("mouseleave", () => this.tooltip.hideUnlessFocused(span));
    span.addEventListener("blur", () => this.tooltip.hide());
    this.completion.append(span);
    this.spans.push(span);
    return span;
  }

  /** One tab stop per choice: the focused token; arrow keys move between tokens. */
  rove(span) {
    for (const s of this.spans) s.tabIndex = s === span ? 0 : -1;
  }

  onKey(event) {
    const i = this.spans.indexOf(document.activeElement);
    if (i < 0) return;
    const moves = { ArrowRight: i + 1, ArrowDown: i + 1, ArrowLeft: i - 1, ArrowUp: i - 1, Home: 0,
      End: this.spans.length - 1 };
    if (!(event.key in moves)) return;
    event.preventDefault();
    const next = this.spans[Math.min(this.spans.length - 1, Math.max(0, moves[event.key]))];
    next.focus();
  }

  finish(reason) {
    this.finishReason = reason;
    this.finishNote.textContent = `finish_reason: ${reason}`;
    this.finishNote.dataset.finish = reason;
    const [symbol, title, removed] = this.ending(reason);
    this.marker.textContent = symbol + (removed ? ` ${removed}` : "");
    this.marker.title = title;
    this.marker.hidden = false;
  }

  /** What ended the choice, as [marker, explanation, text a stop sequence cut from the last token]. */
  ending(reason) {
    if (reason === "length") return ["…", "max_tokens (or the context) reached", ""];
    const generated = this.tokens.filter((t) => !t.prompt);
    const stops = this.context.stops.length > 0;
    if (!this.withTokens || generated.length === 0) {
      return ["⏹", stops ? "a stop sequence or the end-of-text token" : "the end-of-text token", ""];
    }
    const last = generated[generated.length - 1];
    if (last.offset >= this.cps.length && last.piece !== "") return ["⏹", "the end-of-text token", ""];
    const shown = this.slice(generated[0].offset);
    const pieces = generated.map((t) => t.piece).join("");
    const removed = pieces.startsWith(shown) ? pieces.slice(shown.length) : "";
    return ["✂", "cut by a stop sequence" + (removed ? ` (removed: ${JSON.stringify(removed)})` : ""),
      removed ? visible(removed) : ""];
  }
}

/** The one tooltip of the page, filled for whichever token is hovered or focused. */
export class Tooltip {
  constructor(node) {
    this.node = node;
    this.owner = null;
  }

  show(span, token) {
    this.owner = span;
    const n = this.node;
    n.replaceChildren();
    const head = el("div", { class: "tip-head" });
    head.append(el("code", { class: "tip-token" }, visible(token.piece)));
    if (token.prompt) head.append(el("span", { class: "note" }, "prompt token"));
    n.append(head);
    if (token.logprob === null) {
      n.append(el("p", { class: "note" }, "The first prompt token has no log-probability."));
    } else {
      const dl = el("dl");
      for (const [name, value, field] of [["logprob", formatLogprob(token.logprob), "logprob"],
        ["probability", formatProbability(token.logprob), "probability"]]) {
        const row = el("div");
        row.append(el("dt", {}, name), el("dd", { "data-field": field }, value));
        dl.append(row);
      }
      n.append(dl);
    }
    if (token.top) n.append(this.alternatives(token));
    n.hidden = false;
    span.setAttribute("aria-describedby", n.id);
    this.place(span);
  }

  alternatives(token) {
    const table = el("table", { class: "alts" });
    table.append(el("caption", {}, "top alternatives"));
    const entries = Object.entries(token.top).sort((a, b) => b[1] - a[1]);
    for (const [piece, logprob] of entries) {
      const row = el("tr", piece === token.piece ? { class: "chosen" } : {});
      const bar = el("span", { class: "bar", "data-bin": probabilityBin(logprob) });
      bar.style.width = `${Math.max(2, Math.exp(logprob) * 100)}%`;
      const barCell = el("td", { class: "bar-cell" });
      barCell.append(bar);
      row.append(el("td", {}, visible(piece)), barCell, el("td", { class: "num" }, formatProbability(logprob)),
        el("td", { class: "num" }, formatLogprob(logprob)));
      table.append(row);
    }
    return table;
  }

  place(span) {
    const n = this.node;
    const r = span.getBoundingClientRect();
    const width = n.offsetWidth;
    const left = Math.min(Math.max(8, r.left + window.scrollX), window.scrollX + document.documentElement.clientWidth
      - width - 8);
    let top = r.bottom + window.scrollY + 6;
    if (r.bottom + n.offsetHeight + 12 > window.innerHeight && r.top > n.offsetHeight + 12) {
      top = r.top + window.scrollY - n.offsetHeight - 6;   // no room below: above the token
    }
    n.style.left = `${Math.max(8, left)}px`;
    n.style.top = `${top}px`;
  }

  /** Keep the tooltip at its token when the page scrolls or resizes. */
  follow() {
    if (this.owner) this.place(this.owner);
  }

  hideUnlessFocused(span) {
    if (document.activeElement !== span) this.hide();
  }

  hide() {
    if (this.owner) this.owner.removeAttribute("aria-describedby");
    this.owner = null;
    this.node.hidden = true;
  }
}
