// The "All rows" table: sort by a column (click its name again to reverse), filter by words and by column, and
// count the rows shown. Written for this report: no library, nothing fetched. Without it the table is all there,
// unsorted; the controls stay hidden.
(function () {
  "use strict";
  var table = document.getElementById("rows-table");
  var tools = document.getElementById("rows-tools");
  if (!table || !tools) return;
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
  var box = document.getElementById("rows-filter");
  var count = document.getElementById("rows-count");
  var selects = Array.prototype.slice.call(tools.querySelectorAll("select[data-key]"));
  var column = {};
  heads.forEach(function (th, i) { if (th.dataset.key) column[th.dataset.key] = i; });
  var collator = new Intl.Collator(undefined, {numeric: true, sensitivity: "base"});
  // "−" (the report's minus) reads as "-", so a filter typed with a hyphen finds negative numbers
  var plain = function (text) { return text.replace(/\u2212/g, "-").toLowerCase(); };
  var words = rows.map(function (tr) { return plain(tr.textContent); });
  rows.forEach(function (tr, i) { tr.dataset.order = i; });

  // A cell's sort key: data-v (a number, "" when missing) in a numeric column, else its text; null sorts last.
  function key(tr, col, numeric) {
    var td = tr.cells[col];
    if (numeric) {
      var v = td.dataset.v;
      return v === undefined || v === "" || isNaN(Number(v)) ? null : Number(v);
    }
    var text = td.textContent.trim();
    return text === "" || text === "—" ? null : text;
  }

  function sortBy(th) {
    var col = heads.indexOf(th), numeric = th.dataset.sort === "num";
    var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
    var keyed = rows.map(function (tr) { return {k: key(tr, col, numeric), i: Number(tr.dataset.order), tr: tr}; });
    keyed.sort(function (a, b) {
      if (a.k === null || b.k === null) return (a.k === null) - (b.k === null) || a.i - b.i;
      var c = numeric ? a.k - b.k : collator.compare(a.k, b.k);
      return dir * c || a.i - b.i;  // ties keep the file's order
    });
    var frag = document.createDocumentFragment();
    keyed.forEach(function (x) { frag.appendChild(x.tr); });
    body.appendChild(frag);
  }

  function filter() {
    var terms = plain(box.value).split(/\s+/).filter(Boolean);
    var wanted = selects.filter(function (s) { return s.value !== ""; })
      .map(function (s) { return {col: column[s.dataset.key], value: s.value}; });
    var shown = 0;
    rows.forEach(function (tr, i) {
      var ok = terms.every(function (t) { return words[i].indexOf(t) >= 0; }) &&
        wanted.every(function (w) { return tr.cells[w.col].textContent.trim() === w.value; });
      tr.hidden = !ok;
      if (ok) shown += 1;
    });
    count.textContent = shown + " of " + rows.length + " rows";
  }

  heads.forEach(function (th) {
    var button = document.createElement("button");
    button.type = "button";
    button.title = "sort by " + th.textContent.trim();
    while (th.firstChild) button.appendChild(th.firstChild);
    th.appendChild(button);
    th.addEventListener("click", function () { sortBy(th); });  // anywhere in the header cell; the button for keys
  });
  box.addEventListener("input", filter);
  selects.forEach(function (s) { s.addEventListener("change", filter); });
  tools.hidden = false;
  filter();
})();
