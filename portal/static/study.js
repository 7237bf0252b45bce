// Live progress of a study page: poll the status API until the study is done, then reload once
// so the results table shows every prediction. No manual reload needed. While it runs, each row
// shows its own status and result (fetched again whenever the number of finished images changes).
(function () {
  "use strict";
  var card = document.getElementById("progress");
  if (!card || card.dataset.status === "done") { return; }
  var url = card.dataset.statusUrl;
  var bar = document.getElementById("progress-bar");
  var text = document.getElementById("progress-text");
  var badge = document.getElementById("study-status");
  var lastFinished = -1;
  var delay = 1500;
  var table = document.getElementById("results");
  var rowsUrl = table ? table.dataset.rowsUrl : null;

  function setText(row, field, text) {
    var cell = row.querySelector("[data-field='" + field + "']");
    if (cell && cell.textContent !== text) { cell.textContent = text; }
    return cell;
  }
  function updateRow(image) {
    var row = document.getElementById("image-" + image.id);
    if (!row) { return; }
    row.dataset.status = image.status;
    row.dataset.flagged = image.flagged ? "yes" : "no";
    row.classList.toggle("flagged", !!image.flagged);
    row.classList.toggle("failed", image.status === "failed");
    var status = row.querySelector("[data-field='status'] .status");
    if (status) { status.textContent = image.status; status.className = "status " + image.status; }
    setText(row, "label", image.label_name || "");
    var confidence = setText(row, "confidence", image.confidence_text || "");
    if (confidence) { confidence.dataset.value = image.confidence === null ? -1 : image.confidence; }
    var reason = row.querySelector("[data-field='reason']");
    if (reason) {
      reason.textContent = "";
      if (image.reason_text) {
        var tag = document.createElement("span");
        tag.className = image.reason === "audit" ? "tag audit" : "flag";
        tag.textContent = image.reason_text;
        reason.appendChild(tag);
      }
    }
    var review = row.querySelector("[data-field='review']");
    if (review) {
      review.textContent = "";
      if (image.error) {
        var error = document.createElement("span");
        error.className = "error-text";
        error.textContent = image.error;
        review.appendChild(error);
      } else { review.textContent = image.review_text || ""; }
    }
    var open = row.querySelector("[data-field='open']");
    if (open && image.case_url && !open.querySelector("a")) {
      var link = document.createElement("a");
      link.href = image.case_url;
      link.className = "open-case";
      link.textContent = image.reason ? "Review" : "Spot check";
      open.appendChild(link);
    }
  }
  function refreshRows() {
    if (!rowsUrl) { return; }
    fetch(rowsUrl, { headers: { "Accept": "application/json" }, credentials: "same-origin" })
      .then(function (response) { if (!response.ok) { throw new Error("status " + response.status); } return response.json(); })
      .then(function (body) { body.images.forEach(updateRow); })
      .catch(function () { /* the next change tries again */ });
  }

  function show(study) {
    var c = study.counts;
    var finished = c.done + c.failed;
    bar.max = c.total || 1;
    bar.value = finished;
    text.textContent = finished + " of " + c.total + " images finished · " + c.done + " classified · " +
      c.failed + " failed · " + c.flagged + " flagged";
    badge.textContent = study.status;
    badge.className = "status " + study.status;
    return finished;
  }

  function poll() {
    fetch(url, { headers: { "Accept": "application/json" }, credentials: "same-origin" })
      .then(function (response) {
        if (!response.ok) { throw new Error("status " + response.status); }
        return response.json();
      })
      .then(function (study) {
        var finished = show(study);
        if (study.status === "done") { window.location.reload(); return; }
        if (finished !== lastFinished) { refreshRows(); }
        delay = finished !== lastFinished ? 1500 : Math.min(delay * 1.5, 10000);
        lastFinished = finished;
        window.setTimeout(poll, delay);
      })
      .catch(function () { window.setTimeout(poll, 5000); });
  }
  window.setTimeout(poll, 1000);
})();
