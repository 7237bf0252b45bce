// Review viewer: zoom and pan, window/level (brightness/contrast), heat-map overlay, one-key labels.
(function () {
  "use strict";
  var stage = document.getElementById("stage");
  var layer = document.getElementById("layer");
  var xray = document.getElementById("xray");
  var heat = document.getElementById("heatmap");
  var heatToggle = document.getElementById("toggle-heatmap");
  var brightness = document.getElementById("brightness");
  var contrast = document.getElementById("contrast");
  var form = document.getElementById("review-form");
  var chosen = document.getElementById("chosen-label");
  var note = document.getElementById("note");
  var view = { scale: 1, x: 0, y: 0 };

  function render() {
    layer.style.transform = "translate(" + view.x + "px," + view.y + "px) scale(" + view.scale + ")";
    xray.style.filter = "brightness(" + brightness.value / 100 + ") contrast(" + contrast.value / 100 + ")";
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
  document.querySelectorAll(".tools [data-action]").forEach(function (button) {
    button.addEventListener("click", function () {
      var action = button.dataset.action;
      if (action === "zoom-in") { zoom(1.25); } else if (action === "zoom-out") { zoom(1 / 1.25); } else { reset(); }
    });
  });

  function submitLabel(label) {
    if (!form) { return; }
    chosen.value = label;
    form.submit();
  }
  if (form) {
    form.querySelectorAll(".label-button").forEach(function (button) {
      button.addEventListener("click", function (event) {
        event.preventDefault();
        submitLabel(button.dataset.label);
      });
    });
  }

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) { return; }
    var typing = event.target === note;
    if (event.key === "Enter" && form) {
      event.preventDefault();
      submitLabel(form.dataset.modelLabel);
      return;
    }
    if (typing) { return; }
    if (/^[1-9]$/.test(event.key) && form) {
      var button = form.querySelector(".label-button[data-key='" + event.key + "']");
      if (button) { event.preventDefault(); submitLabel(button.dataset.label); }
    } else if (event.key === "h" || event.key === "H") {
      toggleHeat();
    } else if (event.key === "+" || event.key === "=") {
      zoom(1.25);
    } else if (event.key === "-") {
      zoom(1 / 1.25);
    } else if (event.key === "0") {
      reset();
    }
  });
  render();
})();
