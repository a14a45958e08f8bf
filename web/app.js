// The drawing page: a canvas (pointer events: mouse, pen, touch) or an image file goes to the model's REST
// API as base64 image bytes, TF Serving's way; the answer is shown as a digit, its probability and ten bars.
"use strict";

// Relative, so the page works wherever it is served from, next to /v1/ (embedded server or nginx in front).
const PREDICT_URL = "v1/models/mnist:predict";
const BRUSH_WIDTH = 22;  // at 280 px, about MNIST's stroke width once the model shrinks the image to 28x28
const INK = "#111111";
const PAPER = "#ffffff";
const MAX_FILE_BYTES = 12 * 1024 * 1024;  // base64 of it stays under the server's 16 MB request limit

const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const predictButton = document.getElementById("predict");
const clearButton = document.getElementById("clear");
const fileInput = document.getElementById("file");
const drop = document.getElementById("drop");
const preview = document.getElementById("preview");
const statusRegion = document.getElementById("status");
const message = document.getElementById("message");
const answer = document.getElementById("answer");
const digit = document.getElementById("digit");
const probability = document.getElementById("probability");
const error = document.getElementById("error");
const bars = document.getElementById("bars");
const resultCard = document.getElementById("result-heading").parentElement;

let hasInk = false;
let activePointer = null;
let last = null;
let requestId = 0;  // only the answer to the latest request is shown

function percent(p) {
  return `${(100 * p).toFixed(1)}%`;
}

// --- the ten bars -------------------------------------------------------------------------------------

for (let d = 0; d < 10; d++) {
  const item = document.createElement("li");
  item.dataset.digit = String(d);
  item.innerHTML = '<span class="label"></span><span class="track"><span class="fill"></span></span>' +
    '<span class="value">–</span>';
  item.querySelector(".label").textContent = String(d);
  bars.appendChild(item);
}

function showBars(probabilities, top) {
  bars.querySelectorAll("li").forEach((item, d) => {
    const p = probabilities ? probabilities[d] : null;
    item.classList.toggle("top", d === top);
    item.dataset.probability = p === null ? "" : String(p);
    item.querySelector(".fill").style.width = p === null ? "0" : `${Math.max(0, Math.min(1, p)) * 100}%`;
    item.querySelector(".value").textContent = p === null ? "–" : percent(p);
  });
}

// --- what is shown ------------------------------------------------------------------------------------

function showMessage(text) {
  message.textContent = text;
  answer.hidden = true;
  error.hidden = true;
  error.textContent = "";
  showBars(null, -1);
}

// On a phone the answer is below the canvas: bring it into view (no scrolling when it is already visible).
function revealResult() {
  resultCard.scrollIntoView({ block: "nearest" });
}

function showError(text) {
  showMessage("No answer.");
  error.textContent = text;
  error.hidden = false;
  revealResult();
}

function showPrediction(prediction, source) {
  message.textContent = `From ${source}:`;
  digit.textContent = String(prediction.digit);
  probability.textContent = percent(prediction.probability);
  answer.hidden = false;
  error.hidden = true;
  error.textContent = "";
  showBars(prediction.probabilities, prediction.digit);
  revealResult();
}

function isPrediction(p) {
  return p && Number.isInteger(p.digit) && typeof p.probability === "number" &&
    Array.isArray(p.probabilities) && p.probabilities.length === 10;
}

// --- asking the model ---------------------------------------------------------------------------------

async function predict(base64, source) {
  const id = ++requestId;
  statusRegion.setAttribute("aria-busy", "true");
  message.textContent = `Asking the model about ${source}…`;
  try {
    let response;
    try {
      response = await fetch(PREDICT_URL, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ instances: [{ image_bytes: { b64: base64 } }] }),
      });
    } catch (e) {
      if (id === requestId) {
        showError("Could not reach the model server: it is not running, or the network is down. Try again later.");
      }
      return;
    }
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;  // not JSON: a proxy's error page, say
    }
    if (id !== requestId) {
      return;
    }
    if (!response.ok) {
      if (body && typeof body.error === "string") {
        const what = {
          400: "The model server could not read this image",
          404: "The model server does not serve the model mnist",
          413: "The image is too large for the model server",
        }[response.status] || `The model server answered with an error (HTTP ${response.status})`;
        showError(`${what}: ${body.error}`);
      } else if ([502, 503, 504].includes(response.status)) {
        showError(`The model server is not available (HTTP ${response.status}). Try again later.`);
      } else {
        showError(`The server answered HTTP ${response.status} ${response.statusText}`.trim() + ".");
      }
      return;
    }
    const prediction = body && Array.isArray(body.predictions) ? body.predictions[0] : null;
    if (!isPrediction(prediction)) {
      showError("The server's answer is not a prediction of this model.");
      return;
    }
    showPrediction(prediction, source);
  } finally {
    if (id === requestId) {
      statusRegion.removeAttribute("aria-busy");
    }
  }
}

// --- drawing ------------------------------------------------------------------------------------------

function clearPad() {
  ctx.fillStyle = PAPER;  // opaque white, so the PNG is dark ink on a light background
  ctx.fillRect(0, 0, pad.width, pad.height);
  hasInk = false;
}

function canvasPoint(event) {
  const rect = pad.getBoundingClientRect();
  return {
    x: (event.clientX - rect.left) * (pad.width / rect.width),
    y: (event.clientY - rect.top) * (pad.height / rect.height),
  };
}

function strokeTo(point) {
  ctx.beginPath();
  ctx.moveTo(last.x, last.y);
  ctx.lineTo(point.x, point.y);
  ctx.stroke();
  last = point;
}

pad.addEventListener("pointerdown", (event) => {
  if (activePointer !== null || (event.pointerType === "mouse" && event.button !== 0)) {
    return;
  }
  event.preventDefault();
  activePointer = event.pointerId;
  pad.setPointerCapture(event.pointerId);
  ctx.strokeStyle = INK;
  ctx.fillStyle = INK;
  ctx.lineWidth = BRUSH_WIDTH;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  last = canvasPoint(event);
  ctx.beginPath();  // a dot, so that a tap leaves ink too
  ctx.arc(last.x, last.y, BRUSH_WIDTH / 2, 0, 2 * Math.PI);
  ctx.fill();
  hasInk = true;
});

pad.addEventListener("pointermove", (event) => {
  if (event.pointerId !== activePointer) {
    return;
  }
  const coalesced = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
  for (const e of coalesced.length ? coalesced : [event]) {
    strokeTo(canvasPoint(e));
  }
});

function endStroke(event) {
  if (event.pointerId === activePointer) {
    activePointer = null;
    last = null;
  }
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

predictButton.addEventListener("click", () => {
  if (!hasInk) {
    showError("The drawing is empty: draw a digit first, or choose an image file.");
    return;
  }
  forgetFile();
  predict(pad.toDataURL("image/png").split(",", 2)[1], "your drawing");
});

function forgetFile(keepChoice = false) {
  if (!keepChoice) {
    fileInput.value = "";
  }
  preview.hidden = true;
  if (preview.src) {
    URL.revokeObjectURL(preview.src);
    preview.removeAttribute("src");
  }
}

clearButton.addEventListener("click", () => {
  requestId++;  // an answer still on its way is for the old drawing
  statusRegion.removeAttribute("aria-busy");
  clearPad();
  forgetFile();
  showMessage("Nothing asked yet.");
});

// --- files --------------------------------------------------------------------------------------------

function readAsBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function predictFile(file, chosen) {
  if (!file) {
    return;
  }
  forgetFile(chosen);  // a file chosen with the input keeps its name shown there; a dropped one clears it
  preview.src = URL.createObjectURL(file);
  preview.alt = `The chosen file, ${file.name}`;
  preview.hidden = false;
  if (file.size === 0) {
    showError(`${file.name} is empty.`);
    return;
  }
  if (file.size > MAX_FILE_BYTES) {
    showError(`${file.name} is too large (${(file.size / 1048576).toFixed(1)} MB): the limit is 12 MB.`);
    return;
  }
  let base64;
  try {
    base64 = await readAsBase64(file);
  } catch (e) {
    showError(`Could not read ${file.name}: ${e && e.message ? e.message : e}`);
    return;
  }
  // The file's own bytes, unchanged: the model decodes PNG, JPEG, GIF and BMP and says what it cannot read.
  await predict(base64, file.name);
}

fileInput.addEventListener("change", () => predictFile(fileInput.files[0], true));

drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  predictFile(event.dataTransfer.files[0], false);
});

preview.addEventListener("error", () => {
  preview.hidden = true;  // a file the browser cannot show; the model's answer says whether it can read it
});

clearPad();
showBars(null, -1);
