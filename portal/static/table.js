// Results table: sort by clicking a heading, filter by text and by status/flag. Plain JS, no libraries.
(function () {
  "use strict";
  var table = document.getElementById("results");
  if (!table) { return; }
  var body = table.tBodies[0];
  var filter = document.getElementById("results-filter");
  var show = document.getElementById("results-show");

  function cellValue(row, index, kind) {
    var cell = row.cells[index];
    if (kind === "number") { return parseFloat(cell.dataset.value || cell.textContent) || 0; }
    return cell.textContent.trim().toLowerCase();
  }

  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, index) {
    var kind = th.dataset.sort;
    if (!kind) { return; }
    th.classList.add("sortable-heading");
    th.addEventListener("click", function () {
      var ascending = th.dataset.direction !== "asc";
      Array.prototype.forEach.call(table.tHead.rows[0].cells, function (other) { delete other.dataset.direction; });
      th.dataset.direction = ascending ? "asc" : "desc";
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = cellValue(a, index, kind), y = cellValue(b, index, kind);
        return (x < y ? -1 : x > y ? 1 : 0) * (ascending ? 1 : -1);
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });

  function apply() {
    var text = (filter.value || "").toLowerCase();
    var kind = show.value;
    Array.prototype.forEach.call(body.rows, function (row) {
      var matchesText = !text || row.textContent.toLowerCase().indexOf(text) >= 0;
      var matchesKind = !kind || (kind === "flagged" ? row.dataset.flagged === "yes" : row.dataset.status === kind);
      row.hidden = !(matchesText && matchesKind);
    });
  }
  filter.addEventListener("input", apply);
  show.addEventListener("change", apply);
})();
