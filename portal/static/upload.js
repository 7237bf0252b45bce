// Upload form: folders and files by picker or drag-and-drop (folders are walked), sent with a
// progress bar (XMLHttpRequest upload progress); errors in words; the new study's page opens at the end.
(function () {
  "use strict";
  var form = document.querySelector("form.upload");
  if (!form) { return; }
  var zone = document.getElementById("drop-zone");
  var chosen = document.getElementById("chosen");
  var inputs = [document.getElementById("folder-input"), document.getElementById("files-input")];
  var progress = document.getElementById("upload-progress");
  var bar = document.getElementById("upload-bar");
  var percent = document.getElementById("upload-percent");
  var errorBox = document.getElementById("upload-error");
  var submit = document.getElementById("upload-submit");
  var dropped = [];  // { file, name } from drag-and-drop, names relative to what was dropped
  var NOTHING = "Choose at least one image, folder or zip to upload.";

  function picked() {
    var files = dropped.slice();
    inputs.forEach(function (input) {
      Array.prototype.forEach.call(input.files || [], function (file) {
        files.push({ file: file, name: file.webkitRelativePath || file.name });
      });
    });
    return files;
  }
  function megabytes(bytes) { return bytes >= 1e6 ? (bytes / 1e6).toFixed(1) + " MB" : Math.max(1, Math.round(bytes / 1e3)) + " kB"; }
  function describe() {
    var files = picked(), bytes = 0;
    files.forEach(function (item) { bytes += item.file.size; });
    chosen.textContent = files.length ? files.length + " file" + (files.length === 1 ? "" : "s") + " chosen (" + megabytes(bytes) + ")." : "Nothing chosen yet.";
    showError("");
  }
  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = !message;
  }
  inputs.forEach(function (input) { input.addEventListener("change", describe); });

  // A dropped folder is walked: readEntries answers in batches until it answers an empty one.
  function walk(entry, prefix) {
    if (entry.isFile) {
      return new Promise(function (resolve, reject) {
        entry.file(function (file) { resolve([{ file: file, name: prefix + file.name }]); }, reject);
      });
    }
    var reader = entry.createReader(), found = [];
    return new Promise(function (resolve, reject) {
      (function next() {
        reader.readEntries(function (entries) {
          if (!entries.length) {
            Promise.all(found).then(function (lists) { resolve([].concat.apply([], lists)); }, reject);
            return;
          }
          entries.forEach(function (child) { found.push(walk(child, prefix + entry.name + "/")); });
          next();
        }, reject);
      })();
    });
  }
  function droppedFiles(transfer) {
    var items = Array.prototype.slice.call(transfer.items || []), walks = [];
    items.forEach(function (item) {
      var entry = item.kind === "file" && item.webkitGetAsEntry ? item.webkitGetAsEntry() : null;
      if (entry) { walks.push(walk(entry, "")); }
      else if (item.kind === "file") { walks.push(Promise.resolve([{ file: item.getAsFile(), name: item.getAsFile().name }])); }
    });
    if (!items.length) {  // a DataTransfer with files only
      Array.prototype.forEach.call(transfer.files || [], function (file) { walks.push(Promise.resolve([{ file: file, name: file.name }])); });
    }
    return Promise.all(walks).then(function (lists) { return [].concat.apply([], lists); });
  }
  ["dragenter", "dragover"].forEach(function (type) {
    zone.addEventListener(type, function (event) { event.preventDefault(); zone.classList.add("over"); });
  });
  zone.addEventListener("dragleave", function (event) {
    if (!zone.contains(event.relatedTarget)) { zone.classList.remove("over"); }
  });
  zone.addEventListener("drop", function (event) {
    event.preventDefault();
    zone.classList.remove("over");
    droppedFiles(event.dataTransfer).then(function (files) {
      dropped = dropped.concat(files.filter(function (item) { return item.file; }));
      describe();
    }, function (error) { showError("Could not read what was dropped: " + error.message); });
  });

  function finished(request) {
    var body = null;
    try { body = JSON.parse(request.responseText); } catch (e) { body = null; }
    if (request.status >= 200 && request.status < 300 && body && body.redirect) {
      bar.value = 100;
      percent.textContent = "Uploaded; opening the study…";
      window.location.assign(body.redirect);
      return;
    }
    progress.hidden = true;
    submit.disabled = false;
    showError(body && body.error ? body.error : "The upload failed (the server answered " + request.status + ").");
  }
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var files = picked();
    if (!files.length) { showError(NOTHING); return; }
    var data = new FormData();
    data.append("csrf_token", form.querySelector("input[name=csrf_token]").value);
    data.append("name", form.querySelector("input[name=name]").value);
    files.forEach(function (item) { data.append("files", item.file, item.name); });
    var request = new XMLHttpRequest();
    request.open("POST", form.action);
    request.setRequestHeader("Accept", "application/json");
    request.upload.addEventListener("progress", function (e) {
      if (!e.lengthComputable) { return; }
      var share = Math.floor(100 * e.loaded / e.total);
      bar.value = share;
      percent.textContent = share + " % of " + megabytes(e.total);
    });
    request.addEventListener("load", function () { finished(request); });
    request.addEventListener("error", function () {
      progress.hidden = true;
      submit.disabled = false;
      showError("The upload failed: the connection to the portal was lost. Check the studies list below before trying again.");
    });
    showError("");
    bar.value = 0;
    percent.textContent = "0 %";
    progress.hidden = false;
    submit.disabled = true;
    request.send(data);
  });
})();
