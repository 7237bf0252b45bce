// Sortable, searchable tables: every table.sortable sorts by clicking a heading with data-sort
// ("text" or "number"; a cell's data-value wins over its text), and filters its rows by the text
// box named in data-filter and the menu named in data-show (flagged, or a row status). Plain JS.
(function () {
  "use strict";
  function cellValue(row, index, kind) {
    var cell = row.cells[index];
    if (!cell) { return kind === "number" ? -Infinity : ""; }
    if (kind === "number") {
      var value = parseFloat(cell.dataset.value !== undefined ? cell.dataset.value : cell.textContent.replace(/,/g, ""));
      return isNaN(value) ? -Infinity : value;
    }
    return (cell.dataset.value !== undefined ? cell.dataset.value : cell.textContent).trim().toLowerCase();
  }

  function setUp(table) {
    var body = table.tBodies[0];
    if (!body || !table.tHead) { return; }
    var filter = table.dataset.filter ? document.getElementById(table.dataset.filter) : null;
    var show = table.dataset.show ? document.getElementById(table.dataset.show) : null;
    var headings = table.tHead.rows[0].cells;

    Array.prototype.forEach.call(headings, function (th, index) {
      var kind = th.dataset.sort;
      if (!kind) { return; }
      th.classList.add("sortable-heading");
      th.tabIndex = 0;
      th.setAttribute("role", "button");
      function sort() {
        var ascending = th.dataset.direction !== "asc";
        Array.prototype.forEach.call(headings, function (other) { delete other.dataset.direction; });
        th.dataset.direction = ascending ? "asc" : "desc";
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = cellValue(a, index, kind), y = cellValue(b, index, kind);
          return (x < y ? -1 : x > y ? 1 : 0) * (ascending ? 1 : -1);
        });
        rows.forEach(function (row) { body.appendChild(row); });
      }
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (event) {
        if (event.key === "Enter" || event.key === " ") { event.preventDefault(); sort(); }
      });
    });

    function apply() {
      var text = filter ? (filter.value || "").trim().toLowerCase() : "";
      var kind = show ? show.value : "";
      Array.prototype.forEach.call(body.rows, function (row) {
        var matchesText = !text || row.textContent.toLowerCase().indexOf(text) >= 0;
        var matchesKind = !kind || (kind === "flagged" ? row.dataset.flagged === "yes" : row.dataset.status === kind);
        row.hidden = !(matchesText && matchesKind);
      });
    }
    if (filter) { filter.addEventListener("input", apply); }
    if (show) { show.addEventListener("change", apply); }
  }

  document.querySelectorAll("table.sortable").forEach(setUp);
})();
