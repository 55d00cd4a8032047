// Shared helpers: JSON requests to this server, with the write token when the server needs one.
"use strict";

const ESE = {
  tokenKey: "ese_web_token",
  tokenRequired() { return document.body.dataset.tokenRequired === "true"; },
  pathQuote(text) { return encodeURIComponent(text); },
  token() { return sessionStorage.getItem(this.tokenKey); },

  async getJSON(url) {
    const response = await fetch(url, { headers: { Accept: "application/json" } });
    if (!response.ok) { throw new Error(`${url}: HTTP ${response.status}`); }
    return response.json();
  },

  // POST a JSON body; on 401 ask for the token once (kept for this browser tab only).
  async postJSON(url, body) {
    for (let attempt = 0; attempt < 2; attempt++) {
      const headers = { "Content-Type": "application/json", Accept: "application/json" };
      const token = this.token();
      if (token) { headers.Authorization = `Bearer ${token}`; }
      const response = await fetch(url, { method: "POST", headers, body: JSON.stringify(body) });
      if (response.status === 401 && attempt === 0) {
        const entered = window.prompt("This server needs its write token (ESE_WEB_TOKEN):");
        if (!entered) { throw new Error("a write token is required"); }
        sessionStorage.setItem(this.tokenKey, entered.trim());
        continue;
      }
      const data = await response.json().catch(() => ({}));
      if (!response.ok) {
        const detail = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
        throw new Error(detail || `HTTP ${response.status}`);
      }
      return data;
    }
    throw new Error("the write token was refused");
  },
};
