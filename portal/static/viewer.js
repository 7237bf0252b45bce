// Review viewer: the image at full depth windowed on a canvas (window width/centre, presets, invert,
// rotate, flip, zoom, pan, fit, 1:1), a heat-map overlay (opacity, legend, made on request), one-key labels.
//
// Keys never act while the focus is in a text field, a menu or on a link, and Enter is left to the
// browser: Enter in the note does nothing (the form's default button is disabled), Enter on a link
// follows it, Enter on a label button records that label. 1..n record the label shown with that
// number (highest probability first); A accepts the model's label; S skip, P previous, U undo.
(function () {
  "use strict";
  var stage = document.getElementById("stage");
  var layer = document.getElementById("layer");
  var canvas = document.getElementById("xray");
  var stageStatus = document.getElementById("stage-status");
  var heat = document.getElementById("heatmap");
  var heatTools = document.getElementById("heat-tools");
  var heatToggle = document.getElementById("toggle-heatmap");
  var heatOpacity = document.getElementById("heat-opacity");
  var heatOpacityValue = document.getElementById("heat-opacity-value");
  var heatRequest = document.getElementById("request-heatmap");
  var heatMessage = document.getElementById("heatmap-message");
  var keepToggle = document.getElementById("keep-view");
  var widthInput = document.getElementById("ww");
  var centreInput = document.getElementById("wl");
  var presetSelect = document.getElementById("preset");
  var form = document.getElementById("review-form");
  var note = document.getElementById("note");
  var undoForm = document.getElementById("undo-form");
  var skipLink = document.getElementById("skip-case");
  var previousLink = document.getElementById("previous-case");
  var KEEP = "triage.viewer.keep", VIEW = "triage.viewer.view", HEAT = "triage.viewer.heat";
  var MIN_SCALE = 0.02, MAX_SCALE = 40;
  var image = null;       // { width, height, values, maxLevel, meta } from TriagePixels.load
  var quantile = null;    // share -> real value, for the presets
  var view = { scale: 1, x: 0, y: 0, rotate: 0, flipH: false, flipV: false, invert: false };
  var windowing = { centre: 128, width: 256, preset: "full" };
  var sent = false;

  function store(key, value) {
    try { window.localStorage.setItem(key, value); } catch (e) { /* private mode: nothing kept */ }
  }
  function stored(key) {
    try { return window.localStorage.getItem(key); } catch (e) { return null; }
  }
  function keeping() { return keepToggle && keepToggle.checked; }
  function kind() { return image && image.meta.bits > 8 ? "full-depth" : "8-bit"; }
  function round(value) { return Math.round(value * 100) / 100; }

  // --- geometry: the layer is the image at its own size; one transform places, turns and scales it ---
  function turned() { return view.rotate % 180 !== 0; }
  function fitScale() {
    if (!image) { return 1; }
    var w = turned() ? image.height : image.width, h = turned() ? image.width : image.height;
    return Math.min(stage.clientWidth / w, stage.clientHeight / h);
  }
  function place() {
    if (!image) { return; }
    layer.style.transform = "translate(" + view.x + "px," + view.y + "px) scale(" + view.scale + ") rotate(" + view.rotate +
      "deg) scale(" + (view.flipH ? -1 : 1) + "," + (view.flipV ? -1 : 1) + ") translate(" + (-image.width / 2) + "px," + (-image.height / 2) + "px)";
    stage.dataset.zoom = String(round(view.scale / fitScale()));
    document.getElementById("flip-h").setAttribute("aria-pressed", String(view.flipH));
    document.getElementById("flip-v").setAttribute("aria-pressed", String(view.flipV));
    save();
  }
  function fit() {
    view.scale = fitScale();
    view.x = stage.clientWidth / 2;
    view.y = stage.clientHeight / 2;
    place();
  }
  function actualSize() {
    view.scale = 1 / (window.devicePixelRatio || 1);
    place();
  }
  function zoom(factor, cx, cy) {
    cx = cx === undefined ? stage.clientWidth / 2 : cx;
    cy = cy === undefined ? stage.clientHeight / 2 : cy;
    var next = Math.min(MAX_SCALE, Math.max(MIN_SCALE, view.scale * factor));
    factor = next / view.scale;
    view.x = cx - (cx - view.x) * factor;
    view.y = cy - (cy - view.y) * factor;
    view.scale = next;
    place();
  }

  // --- windowing: a lookup table from the image's levels to grey, painted into the canvas ---
  var context = null, frame = null, pixels32 = null, painting = false;
  function inverse() { return Boolean(image && image.meta.inverse) !== view.invert; }
  function paint() {
    painting = false;
    if (!image) { return; }
    var table = window.TriagePixels.lookupTable(image, windowing.centre, windowing.width, inverse());
    var values = image.values;
    for (var i = 0; i < values.length; i++) { pixels32[i] = table[values[i]]; }
    context.putImageData(frame, 0, 0);
  }
  function setWindow(centre, width, preset) {
    windowing.width = Math.max(1, width);
    windowing.centre = centre;
    windowing.preset = preset || "custom";
    widthInput.value = round(windowing.width);
    centreInput.value = round(windowing.centre);
    presetSelect.value = windowing.preset;
    stage.dataset.ww = widthInput.value;
    stage.dataset.wl = centreInput.value;
    document.getElementById("invert").setAttribute("aria-pressed", String(view.invert));
    if (!painting) { painting = true; window.requestAnimationFrame(paint); }
    save();
  }
  function between(low, high) {  // the window that spans real values low..high
    return { centre: (low + high) / 2 + 0.5, width: Math.abs(high - low) + 1 };
  }
  function presetWindow(name) {
    var meta = image.meta, span;
    if (name === "file" && isFinite(meta.window_center) && isFinite(meta.window_width)) {
      return { centre: meta.window_center, width: meta.window_width };
    }
    if ((name === "bone" || name === "soft") && meta.units === "HU") {  // CT numbers: the usual windows
      return name === "bone" ? { centre: 400, width: 1800 } : { centre: 40, width: 400 };
    }
    // Radiographs have no fixed scale: a preset spans a share of this image's values, counted from
    // the dark end of the display (MONOCHROME1 shows low values bright, so it counts from the top).
    var bright = function (share) { return quantile(meta.inverse ? 1 - share : share); };
    if (name === "bone") { span = between(bright(0.6), bright(0.998)); }
    else if (name === "soft") { span = between(bright(0.1), bright(0.7)); }
    else { span = between(meta.low, meta.high); }
    return span;
  }
  function applyPreset(name) {
    if (!image) { return; }
    if (name === "file" && presetSelect.querySelector("option[value=file]").hidden) { name = "full"; }
    var chosen = presetWindow(name);
    setWindow(chosen.centre, chosen.width, name);
  }
  function defaultPreset() {
    return isFinite(image.meta.window_center) && isFinite(image.meta.window_width) ? "file" : "full";
  }

  // --- kept between cases (a toggle) ---
  function save() {
    if (!keeping() || !image) { return; }
    store(VIEW, JSON.stringify({
      zoom: view.scale / fitScale(), dx: view.x - stage.clientWidth / 2, dy: view.y - stage.clientHeight / 2,
      rotate: view.rotate, flipH: view.flipH, flipV: view.flipV, invert: view.invert,
      preset: windowing.preset, centre: windowing.centre, width: windowing.width, kind: kind(),
    }));
  }
  function restore() {
    var kept = null;
    if (keepToggle && keepToggle.checked) {
      try { kept = JSON.parse(stored(VIEW) || "null"); } catch (e) { kept = null; }
    }
    fit();
    if (!kept || !isFinite(kept.zoom)) { applyPreset(defaultPreset()); return; }
    view.rotate = [0, 90, 180, 270].indexOf(kept.rotate) >= 0 ? kept.rotate : 0;
    view.flipH = kept.flipH === true;
    view.flipV = kept.flipV === true;
    view.invert = kept.invert === true;
    view.scale = Math.min(MAX_SCALE, Math.max(MIN_SCALE, fitScale() * kept.zoom));
    view.x = stage.clientWidth / 2 + (isFinite(kept.dx) ? kept.dx : 0);
    view.y = stage.clientHeight / 2 + (isFinite(kept.dy) ? kept.dy : 0);
    place();
    if (kept.preset === "custom" && kept.kind === kind() && isFinite(kept.centre) && isFinite(kept.width)) {
      setWindow(kept.centre, kept.width, "custom");
    } else {
      applyPreset(["file", "full", "bone", "soft"].indexOf(kept.preset) >= 0 ? kept.preset : defaultPreset());
    }
  }
  function reset() {
    view.rotate = 0;
    view.flipH = view.flipV = view.invert = false;
    fit();
    applyPreset(defaultPreset());
  }

  function show(loaded) {
    image = loaded;
    canvas.width = image.width;
    canvas.height = image.height;
    layer.style.width = image.width + "px";
    layer.style.height = image.height + "px";
    context = canvas.getContext("2d");
    frame = context.createImageData(image.width, image.height);
    pixels32 = new Uint32Array(frame.data.buffer);
    quantile = window.TriagePixels.quantiles(image);
    var fileOption = presetSelect.querySelector("option[value=file]");
    if (isFinite(image.meta.window_center) && isFinite(image.meta.window_width)) {
      fileOption.hidden = false;
      fileOption.textContent = "File's window" + (image.meta.window_name ? " (" + image.meta.window_name + ")" : "");
    }
    var depth = image.meta.bits > 8 ? image.meta.bits + "-bit values" + (image.meta.units ? " (" + image.meta.units + ")" : "") : "8-bit grey levels";
    stage.title = image.width + " × " + image.height + ", " + depth +
      (image.meta.photometric ? ", " + image.meta.photometric + (image.meta.inverse ? ": low values shown bright" : "") : "");
    restore();
    stageStatus.hidden = true;
    stage.dataset.ready = "1";
  }
  window.TriagePixels.load(stage.dataset.pixelsUrl).then(show, function (error) {
    stageStatus.textContent = "The image cannot be shown: " + error.message;
    stage.dataset.ready = "error";
  });

  // --- pointer: drag pans; Shift-drag or right-drag sets the window, in proportion to the value range ---
  stage.addEventListener("wheel", function (event) {
    event.preventDefault();
    var rect = stage.getBoundingClientRect();
    zoom(event.deltaY < 0 ? 1.15 : 1 / 1.15, event.clientX - rect.left, event.clientY - rect.top);
  }, { passive: false });
  stage.addEventListener("contextmenu", function (event) { event.preventDefault(); });
  var drag = null;
  stage.addEventListener("pointerdown", function (event) {
    drag = { x: event.clientX, y: event.clientY, vx: view.x, vy: view.y, level: event.shiftKey || event.button === 2,
             centre: windowing.centre, width: windowing.width };
    stage.setPointerCapture(event.pointerId);
  });
  stage.addEventListener("pointermove", function (event) {
    if (!drag || !image) { return; }
    var dx = event.clientX - drag.x, dy = event.clientY - drag.y;
    if (drag.level) {
      // Dragging across the whole view changes the window by the image's whole value range.
      var range = Math.max(1, image.meta.high - image.meta.low);
      setWindow(drag.centre + dy * range / stage.clientHeight, drag.width + dx * range / stage.clientWidth, "custom");
    } else {
      view.x = drag.vx + dx;
      view.y = drag.vy + dy;
      place();
    }
  });
  stage.addEventListener("pointerup", function () { drag = null; });
  window.addEventListener("resize", function () { if (image) { fit(); } });

  function typedWindow() {
    var width = Number(widthInput.value), centre = Number(centreInput.value);
    if (widthInput.value !== "" && centreInput.value !== "" && isFinite(width) && isFinite(centre) && width >= 1) {
      setWindow(centre, width, "custom");
    }
  }
  widthInput.addEventListener("change", typedWindow);
  centreInput.addEventListener("change", typedWindow);
  presetSelect.addEventListener("change", function () { applyPreset(presetSelect.value); });
  if (keepToggle) {
    keepToggle.checked = stored(KEEP) === "1";
    keepToggle.addEventListener("change", function () {
      store(KEEP, keepToggle.checked ? "1" : "0");
      save();
    });
  }
  function act(action) {
    if (action === "zoom-in") { zoom(1.25); }
    else if (action === "zoom-out") { zoom(1 / 1.25); }
    else if (action === "fit") { fit(); }
    else if (action === "actual") { actualSize(); }
    else if (action === "rotate") { view.rotate = (view.rotate + 90) % 360; fit(); }
    else if (action === "flip-h") { view.flipH = !view.flipH; place(); }
    else if (action === "flip-v") { view.flipV = !view.flipV; place(); }
    else if (action === "invert") { view.invert = !view.invert; setWindow(windowing.centre, windowing.width, windowing.preset); }
    else if (action === "reset") { reset(); }
  }
  document.querySelectorAll(".tools [data-action]").forEach(function (button) {
    button.addEventListener("click", function () { act(button.dataset.action); });
  });

  // --- heat map: shown over the image only (it lives in the image's layer), opacity, made on request ---
  function heatReady(url) {
    heatTools.dataset.status = "ready";
    if (url && !heat.getAttribute("src")) { heat.src = url; }
    heatToggle.disabled = false;
  }
  function toggleHeat(force) {
    if (heatToggle.disabled) { return; }
    var on = force === undefined ? heat.hidden : force;
    heat.hidden = !on;
    heatToggle.checked = on;
  }
  function setOpacity(percent) {
    heat.style.opacity = String(percent / 100);
    heatOpacityValue.textContent = percent + " %";
    store(HEAT, String(percent));
  }
  var keptOpacity = Number(stored(HEAT));
  if (stored(HEAT) !== null && isFinite(keptOpacity) && keptOpacity >= 0 && keptOpacity <= 100) { heatOpacity.value = keptOpacity; }
  setOpacity(Number(heatOpacity.value));
  heatOpacity.addEventListener("input", function () { setOpacity(Number(heatOpacity.value)); });
  heatToggle.addEventListener("change", function () { toggleHeat(heatToggle.checked); });
  function csrf() {
    var tag = document.querySelector("meta[name=csrf-token]");
    return tag ? tag.content : "";
  }
  function heatState(state) {
    if (state.status === "ready") {
      heatReady(state.url);
      heatMessage.textContent = "";
      toggleHeat(true);
      return false;
    }
    heatTools.dataset.status = state.status;
    if (state.status === "failed") {
      heatMessage.textContent = state.error;
      if (heatRequest) { heatRequest.disabled = false; heatRequest.textContent = "Try again"; }
      return false;
    }
    heatMessage.textContent = "Making the heat map… (a worker computes it)";
    return true;
  }
  function pollHeat() {
    fetch(heatTools.dataset.statusUrl, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { if (!r.ok) { throw new Error("status " + r.status); } return r.json(); })
      .then(function (state) { if (heatState(state.status === "absent" ? { status: "pending" } : state)) { window.setTimeout(pollHeat, 2000); } })
      .catch(function () { window.setTimeout(pollHeat, 5000); });
  }
  if (heatRequest) {
    heatRequest.addEventListener("click", function () {
      heatRequest.disabled = true;
      fetch(heatTools.dataset.requestUrl, { method: "POST", credentials: "same-origin",
                                             headers: { "X-CSRFToken": csrf(), "Accept": "application/json" } })
        .then(function (r) { if (!r.ok) { throw new Error("the server answered " + r.status); } return r.json(); })
        .then(function (state) { if (heatState(state)) { window.setTimeout(pollHeat, 1000); } })
        .catch(function (error) { heatRequest.disabled = false; heatMessage.textContent = "Could not ask for a heat map: " + error.message; });
    });
  }

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
      act("zoom-in");
    } else if (key === "-") {
      act("zoom-out");
    } else if (key === "0") {
      act("reset");
    } else if (key === "f" || key === "F") {
      act("fit");
    } else if (key === "i" || key === "I") {
      act("invert");
    } else if (key === "r" || key === "R") {
      act("rotate");
    }
  });
})();
