// Review viewer: zoom and pan, window/level (brightness/contrast), heat-map overlay, one-key labels.
//
// Keys never act while the focus is in a text field, a menu or on a link, and Enter is left to the
// browser: Enter in the note does nothing (the form's default button is disabled), Enter on a link
// follows it, Enter on a label button records that label. 1..n record the label shown with that
// number (highest probability first); A accepts the model's label; S skip, P previous, U undo.
(function () {
  "use strict";
  var stage = document.getElementById("stage");
  var layer = document.getElementById("layer");
  var xray = document.getElementById("xray");
  var heat = document.getElementById("heatmap");
  var heatToggle = document.getElementById("toggle-heatmap");
  var keepToggle = document.getElementById("keep-view");
  var brightness = document.getElementById("brightness");
  var contrast = document.getElementById("contrast");
  var form = document.getElementById("review-form");
  var note = document.getElementById("note");
  var undoForm = document.getElementById("undo-form");
  var skipLink = document.getElementById("skip-case");
  var previousLink = document.getElementById("previous-case");
  var KEEP = "triage.viewer.keep", VIEW = "triage.viewer.view";
  var view = { scale: 1, x: 0, y: 0 };
  var sent = false;

  function store(key, value) {
    try { window.localStorage.setItem(key, value); } catch (e) { /* private mode: nothing kept */ }
  }
  function stored(key) {
    try { return window.localStorage.getItem(key); } catch (e) { return null; }
  }
  function keeping() { return keepToggle && keepToggle.checked; }
  function save() {
    if (!keeping()) { return; }
    store(VIEW, JSON.stringify({ scale: view.scale, x: view.x, y: view.y, b: +brightness.value, c: +contrast.value }));
  }
  function render() {
    layer.style.transform = "translate(" + view.x + "px," + view.y + "px) scale(" + view.scale + ")";
    xray.style.filter = "brightness(" + brightness.value / 100 + ") contrast(" + contrast.value / 100 + ")";
    save();
  }
  function zoom(factor, cx, cy) {
    var rect = stage.getBoundingClientRect();
    cx = cx === undefined ? rect.width / 2 : cx;
    cy = cy === undefined ? rect.height / 2 : cy;
    var next = Math.min(20, Math.max(0.2, view.scale * factor));
    factor = next / view.scale;
    view.x = cx - (cx - view.x) * factor;
    view.y = cy - (cy - view.y) * factor;
    view.scale = next;
    render();
  }
  function reset() {
    view = { scale: 1, x: 0, y: 0 };
    brightness.value = 100;
    contrast.value = 100;
    render();
  }
  function restore() {
    if (!keepToggle) { return; }
    keepToggle.checked = stored(KEEP) === "1";
    if (!keepToggle.checked) { return; }
    try {
      var kept = JSON.parse(stored(VIEW) || "null");
      if (kept && isFinite(kept.scale) && isFinite(kept.x) && isFinite(kept.y)) {
        view = { scale: Math.min(20, Math.max(0.2, kept.scale)), x: kept.x, y: kept.y };
        if (isFinite(kept.b)) { brightness.value = kept.b; }
        if (isFinite(kept.c)) { contrast.value = kept.c; }
      }
    } catch (e) { /* a damaged value: start from the default view */ }
  }
  function toggleHeat(force) {
    if (!heat) { return; }
    var on = force === undefined ? heat.hidden : force;
    heat.hidden = !on;
    if (heatToggle) { heatToggle.checked = on; }
  }

  stage.addEventListener("wheel", function (event) {
    event.preventDefault();
    var rect = stage.getBoundingClientRect();
    zoom(event.deltaY < 0 ? 1.15 : 1 / 1.15, event.clientX - rect.left, event.clientY - rect.top);
  }, { passive: false });

  var drag = null;
  stage.addEventListener("pointerdown", function (event) {
    drag = { x: event.clientX, y: event.clientY, vx: view.x, vy: view.y, level: event.shiftKey,
             b: +brightness.value, c: +contrast.value };
    stage.setPointerCapture(event.pointerId);
  });
  stage.addEventListener("pointermove", function (event) {
    if (!drag) { return; }
    var dx = event.clientX - drag.x, dy = event.clientY - drag.y;
    if (drag.level) {  // window/level: horizontal = contrast (window), vertical = brightness (level)
      contrast.value = Math.max(20, Math.min(400, drag.c + dx));
      brightness.value = Math.max(20, Math.min(300, drag.b - dy));
    } else {
      view.x = drag.vx + dx;
      view.y = drag.vy + dy;
    }
    render();
  });
  stage.addEventListener("pointerup", function () { drag = null; });

  brightness.addEventListener("input", render);
  contrast.addEventListener("input", render);
  if (heatToggle) { heatToggle.addEventListener("change", function () { toggleHeat(heatToggle.checked); }); }
  if (keepToggle) {
    keepToggle.addEventListener("change", function () {
      store(KEEP, keepToggle.checked ? "1" : "0");
      save();
    });
  }
  document.querySelectorAll(".tools [data-action]").forEach(function (button) {
    button.addEventListener("click", function () {
      var action = button.dataset.action;
      if (action === "zoom-in") { zoom(1.25); } else if (action === "zoom-out") { zoom(1 / 1.25); } else { reset(); }
    });
  });

  if (form) {
    form.addEventListener("submit", function (event) {
      // Only a label button records a label, and only once per page.
      var submitter = event.submitter;
      if (sent || !submitter || submitter.name !== "label") { event.preventDefault(); return; }
      sent = true;
    });
  }
  if (note) {
    note.addEventListener("keydown", function (event) {
      if (event.key === "Enter") { event.preventDefault(); }
    });
  }

  function record(button) {
    if (!button || sent) { return; }
    button.click();
  }
  function editing(target) {
    if (!target || !target.closest) { return false; }
    return !!target.closest("input:not([type=range]):not([type=checkbox]), textarea, select, [contenteditable], a[href]");
  }

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey || event.isComposing) { return; }
    if (editing(event.target)) { return; }
    var key = event.key;
    if (/^[1-9]$/.test(key) && form) {
      if (event.repeat) { event.preventDefault(); return; }
      var button = form.querySelector(".label-button[data-key='" + key + "']");
      if (button) { event.preventDefault(); record(button); }
    } else if ((key === "a" || key === "A") && form) {
      event.preventDefault();
      if (!event.repeat) { record(form.querySelector(".label-button.model")); }
    } else if ((key === "s" || key === "S") && skipLink) {
      event.preventDefault();
      window.location.assign(skipLink.href);
    } else if ((key === "p" || key === "P") && previousLink) {
      event.preventDefault();
      window.location.assign(previousLink.href);
    } else if ((key === "u" || key === "U") && undoForm) {
      event.preventDefault();
      if (!event.repeat) { undoForm.requestSubmit(); }
    } else if (key === "h" || key === "H") {
      toggleHeat();
    } else if (key === "+" || key === "=") {
      zoom(1.25);
    } else if (key === "-") {
      zoom(1 / 1.25);
    } else if (key === "0") {
      reset();
    }
  });
  restore();
  render();
})();
