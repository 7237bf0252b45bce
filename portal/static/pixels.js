// Full-depth pixels for the viewer: a greyscale PNG decoder (8 or 16 bits, so 16-bit values survive:
// a canvas would round them to 8), and window/level as a lookup table into an RGBA canvas.
//
// window.TriagePixels.load(url) -> Promise of { width, height, values (Uint16Array or Uint8Array),
// maxLevel, meta } where meta holds the PNG's "triage:" text chunks as numbers or strings (see
// core/pixels.py): a PNG value p stands for the real value offset + p * step.
(function () {
  "use strict";
  var SIGNATURE = [137, 80, 78, 71, 13, 10, 26, 10];

  function u32(bytes, at) {
    return ((bytes[at] << 24) | (bytes[at + 1] << 16) | (bytes[at + 2] << 8) | bytes[at + 3]) >>> 0;
  }
  function latin1(bytes) {
    var text = "";
    for (var i = 0; i < bytes.length; i++) { text += String.fromCharCode(bytes[i]); }
    return text;
  }

  function chunks(bytes) {
    for (var s = 0; s < SIGNATURE.length; s++) {
      if (bytes[s] !== SIGNATURE[s]) { throw new Error("not a PNG file"); }
    }
    var found = { idat: [], text: {} }, at = 8;
    while (at + 8 <= bytes.length) {
      var length = u32(bytes, at), type = latin1(bytes.subarray(at + 4, at + 8));
      var data = bytes.subarray(at + 8, at + 8 + length);
      if (type === "IHDR") {
        found.width = u32(data, 0);
        found.height = u32(data, 4);
        found.depth = data[8];
        found.colour = data[9];
        found.interlace = data[12];
      } else if (type === "tEXt") {
        var zero = data.indexOf(0);
        found.text[latin1(data.subarray(0, zero))] = latin1(data.subarray(zero + 1));
      } else if (type === "IDAT") {
        found.idat.push(data);
      } else if (type === "IEND") {
        break;
      }
      at += 12 + length;
    }
    if (found.colour !== 0 || (found.depth !== 8 && found.depth !== 16) || found.interlace !== 0) {
      throw new Error("unsupported PNG (want 8- or 16-bit greyscale, not interlaced)");
    }
    return found;
  }

  function inflate(parts) {
    var stream = new Blob(parts).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Response(stream).arrayBuffer().then(function (buffer) { return new Uint8Array(buffer); });
  }

  // Undo the PNG row filters (none, sub, up, average, Paeth) in place into one array of rows.
  function unfilter(raw, height, stride, bpp) {
    var out = new Uint8Array(height * stride), previous = new Uint8Array(stride);
    for (var y = 0; y < height; y++) {
      var kind = raw[y * (stride + 1)], source = y * (stride + 1) + 1, row = y * stride;
      for (var x = 0; x < stride; x++) {
        var value = raw[source + x];
        var left = x >= bpp ? out[row + x - bpp] : 0, up = previous[x];
        var corner = x >= bpp && y > 0 ? out[row - stride + x - bpp] : 0;
        if (kind === 1) { value += left; }
        else if (kind === 2) { value += up; }
        else if (kind === 3) { value += (left + up) >> 1; }
        else if (kind === 4) {
          var p = left + up - corner, pa = Math.abs(p - left), pb = Math.abs(p - up), pc = Math.abs(p - corner);
          value += (pa <= pb && pa <= pc) ? left : (pb <= pc ? up : corner);
        }
        out[row + x] = value & 255;
      }
      previous = out.subarray(row, row + stride);
    }
    return out;
  }

  function meta(text) {
    var found = {};
    Object.keys(text).forEach(function (key) {
      if (key.indexOf("triage:") !== 0) { return; }
      var name = key.slice(7), value = text[key], number = Number(value);
      found[name] = value !== "" && isFinite(number) ? number : value;
    });
    return found;
  }

  function load(url) {
    return fetch(url, { credentials: "same-origin" })
      .then(function (response) {
        if (!response.ok) {
          return response.text().then(function (body) { throw new Error("the server answered " + response.status + ": " + body.slice(0, 200)); });
        }
        return response.arrayBuffer();
      })
      .then(function (buffer) {
        var png = chunks(new Uint8Array(buffer));
        return inflate(png.idat).then(function (raw) {
          var bpp = png.depth / 8, stride = png.width * bpp;
          var rows = unfilter(raw, png.height, stride, bpp), values, maxLevel = 0, i;
          if (bpp === 2) {
            values = new Uint16Array(png.width * png.height);
            for (i = 0; i < values.length; i++) { values[i] = (rows[2 * i] << 8) | rows[2 * i + 1]; }
          } else {
            values = rows;
          }
          for (i = 0; i < values.length; i++) { if (values[i] > maxLevel) { maxLevel = values[i]; } }
          return { width: png.width, height: png.height, values: values, maxLevel: maxLevel, meta: meta(png.text) };
        });
      });
  }

  // The DICOM linear VOI function (PS3.3 C.11.2.1.2): the grey level 0-255 of real value v.
  function windowed(v, centre, width) {
    if (width <= 1) { return v < centre ? 0 : 255; }
    var low = centre - 0.5 - (width - 1) / 2, high = centre - 0.5 + (width - 1) / 2;
    if (v <= low) { return 0; }
    if (v > high) { return 255; }
    return Math.round(((v - (centre - 0.5)) / (width - 1) + 0.5) * 255);
  }

  // One packed RGBA (little-endian ABGR) entry per PNG level: grey, opaque.
  function lookupTable(image, centre, width, inverse) {
    var table = new Uint32Array(image.maxLevel + 1), offset = image.meta.offset || 0, step = image.meta.step || 1;
    for (var p = 0; p < table.length; p++) {
      var grey = windowed(offset + p * step, centre, width);
      if (inverse) { grey = 255 - grey; }
      table[p] = (0xff000000 | (grey << 16) | (grey << 8) | grey) >>> 0;
    }
    return table;
  }

  // Cumulative histogram of the levels, for quantiles of the image's values.
  function quantiles(image) {
    var counts = new Float64Array(image.maxLevel + 1), values = image.values, i;
    for (i = 0; i < values.length; i++) { counts[values[i]] += 1; }
    for (i = 1; i < counts.length; i++) { counts[i] += counts[i - 1]; }
    var total = counts[counts.length - 1], offset = image.meta.offset || 0, step = image.meta.step || 1;
    return function (share) {  // the real value below which `share` of the pixels lie
      var wanted = share * total, lo = 0, hi = counts.length - 1;
      while (lo < hi) { var mid = (lo + hi) >> 1; if (counts[mid] < wanted) { lo = mid + 1; } else { hi = mid; } }
      return offset + lo * step;
    };
  }

  window.TriagePixels = { load: load, lookupTable: lookupTable, quantiles: quantiles, windowed: windowed };
})();
