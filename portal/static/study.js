// Live progress of a study page: poll the status API until the study is done, then reload once
// so the results table shows every prediction. No manual reload needed.
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
        delay = finished !== lastFinished ? 1500 : Math.min(delay * 1.5, 10000);
        lastFinished = finished;
        window.setTimeout(poll, delay);
      })
      .catch(function () { window.setTimeout(poll, 5000); });
  }
  window.setTimeout(poll, 1000);
})();
