// Live progress on the studies list: poll the JSON list while any study is unfinished.
(function () {
  "use strict";
  var table = document.getElementById("studies");
  if (!table) { return; }
  var url = table.dataset.listUrl;

  function unfinished() {
    return table.querySelectorAll("tbody tr:not([data-status='done'])").length > 0;
  }

  function update(study) {
    var row = table.querySelector("tr[data-study='" + study.id + "']");
    if (!row) { return; }
    var c = study.counts;
    row.dataset.status = study.status;
    var badge = row.querySelector("[data-field='status']");
    badge.textContent = study.status;
    badge.className = "status " + study.status;
    ["done", "failed", "flagged", "total"].forEach(function (key) {
      row.querySelector("[data-field='" + key + "']").textContent = c[key];
    });
    var bar = row.querySelector("[data-field='progress']");
    bar.max = c.total || 1;
    bar.value = c.done + c.failed;
    var share = row.querySelector("[data-field='progress-share']");
    if (share) { share.dataset.value = c.total ? (c.done + c.failed) / c.total : 0; }
    var suspected = row.querySelector("[data-field='suspected_fractures']");
    if (suspected) {
      suspected.textContent = study.suspected_fractures === null ? "" : study.suspected_fractures;
      suspected.dataset.value = study.suspected_fractures === null ? -1 : study.suspected_fractures;
    }
  }

  function poll() {
    if (!unfinished()) { return; }
    fetch(url, { headers: { "Accept": "application/json" }, credentials: "same-origin" })
      .then(function (r) { if (!r.ok) { throw new Error("status " + r.status); } return r.json(); })
      .then(function (body) { body.studies.forEach(update); window.setTimeout(poll, 2000); })
      .catch(function () { window.setTimeout(poll, 5000); });
  }
  window.setTimeout(poll, 1500);
})();
