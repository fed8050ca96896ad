// The 2-D map of a slide job on a <canvas>: one dot per patch at its first two principal components.
// A canvas instead of one SVG element per patch keeps slides with tens of thousands of patches fast.
// The map is laid out once in a square of MAP_SIZE units and redrawn at the canvas' device-pixel size
// whenever that size changes. Hovering or touching a dot shows its patch, as a tooltip.
"use strict";

const MAP_SIZE = 400;
const MAP_MARGIN = 24;
// Okabe and Ito's palette, distinguishable by most readers with colour-vision deficiency. KMeans uses k <= 8.
const CLUSTER_COLOURS = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000"];
const POINT_OUTLINE = "rgba(0, 0, 0, 0.35)";
// Map units around a dot's edge that still count as hovering it, so small dots are easy to reach.
const HOVER_SLACK = 3;

// The state of each drawn map, by its canvas: the layout, the colour mode and the draw order.
const mapStates = new WeakMap();
let mapResizeObserver = null;

// Return [min, max] of values, with a non-zero span.
function valueRange(values) {
  let low = Infinity;
  let high = -Infinity;
  for (const value of values) {
    low = Math.min(low, value);
    high = Math.max(high, value);
  }
  return high > low ? [low, high] : [low - 1, low + 1];
}

function pointRadius(count) {
  if (count < 300) {
    return 5;
  }
  return count < 3000 ? 2.5 : 1.2;
}

// Hue follows the patch's left-to-right position on the slide and lightness its top-to-bottom position.
// Both are rounded to whole units, so dots of nearly the same colour are drawn in one batch.
function positionColour(point, pxRange, pyRange) {
  const u = (point.px - pxRange[0]) / (pxRange[1] - pxRange[0]);
  const v = (point.py - pyRange[0]) / (pyRange[1] - pyRange[0]);
  return `hsl(${Math.round(20 + 280 * u)}, 70%, ${Math.round(30 + 40 * v)}%)`;
}

// Place every point in the MAP_SIZE square and compute both of its colours.
function layOutMap(points) {
  const count = points.length;
  const [xLow, xHigh] = valueRange(points.map((point) => point.x));
  const [yLow, yHigh] = valueRange(points.map((point) => point.y));
  // Each axis is scaled to fill the square, as scatter plots usually are: the first component's spread
  // is often several times the second's, which one shared scale would squeeze into a thin band.
  const xScale = (MAP_SIZE - 2 * MAP_MARGIN) / (xHigh - xLow);
  const yScale = (MAP_SIZE - 2 * MAP_MARGIN) / (yHigh - yLow);
  const pxRange = valueRange(points.map((point) => point.px));
  const pyRange = valueRange(points.map((point) => point.py));

  const xs = new Float64Array(count);
  const ys = new Float64Array(count);
  const positionColours = new Array(count);
  const clusterColours = new Array(count);
  points.forEach((point, index) => {
    xs[index] = MAP_MARGIN + xScale * (point.x - xLow);
    // The canvas' y axis points down, so the second component is flipped to read like a plot.
    ys[index] = MAP_SIZE - MAP_MARGIN - yScale * (point.y - yLow);
    positionColours[index] = positionColour(point, pxRange, pyRange);
    clusterColours[index] = CLUSTER_COLOURS[point.cluster % CLUSTER_COLOURS.length];
  });
  const radius = pointRadius(count);
  return { points, xs, ys, radius, positionColours, clusterColours, grid: buildPointGrid(xs, ys, radius + HOVER_SLACK) };
}

// Bucket the points into square cells, so a hover looks only at the cells near the pointer.
// The cells are stored as one index array sorted by cell (a counting sort), with each cell's start.
function buildPointGrid(xs, ys, reach) {
  const cellSize = Math.max(8, 2 * reach);
  const columns = Math.ceil(MAP_SIZE / cellSize);
  const cellOf = (index) => gridCell(ys[index], cellSize, columns) * columns + gridCell(xs[index], cellSize, columns);
  const starts = new Int32Array(columns * columns + 1);
  for (let index = 0; index < xs.length; index += 1) {
    starts[cellOf(index) + 1] += 1;
  }
  for (let cell = 0; cell < columns * columns; cell += 1) {
    starts[cell + 1] += starts[cell];
  }
  const next = starts.slice(0, columns * columns);
  const order = new Int32Array(xs.length);
  for (let index = 0; index < xs.length; index += 1) {
    const cell = cellOf(index);
    order[next[cell]] = index;
    next[cell] += 1;
  }
  return { cellSize, columns, starts, order };
}

function gridCell(value, cellSize, columns) {
  return Math.min(columns - 1, Math.max(0, Math.floor(value / cellSize)));
}

// Return the index of the point under (x, y) in map units, or -1. A dot that covers the position wins,
// the topmost as drawn when several do; otherwise the nearest dot within HOVER_SLACK of its edge.
function pointAt(state, x, y) {
  const { xs, ys, radius, grid } = state.layout;
  const reach = radius + HOVER_SLACK;
  const firstColumn = gridCell(x - reach, grid.cellSize, grid.columns);
  const lastColumn = gridCell(x + reach, grid.cellSize, grid.columns);
  const firstRow = gridCell(y - reach, grid.cellSize, grid.columns);
  const lastRow = gridCell(y + reach, grid.cellSize, grid.columns);
  let covering = -1;
  let nearest = -1;
  let nearestDistance = reach * reach;
  for (let row = firstRow; row <= lastRow; row += 1) {
    for (let column = firstColumn; column <= lastColumn; column += 1) {
      const cell = row * grid.columns + column;
      for (let slot = grid.starts[cell]; slot < grid.starts[cell + 1]; slot += 1) {
        const index = grid.order[slot];
        const distance = (xs[index] - x) ** 2 + (ys[index] - y) ** 2;
        if (distance <= radius * radius && (covering < 0 || state.drawRank[index] > state.drawRank[covering])) {
          covering = index;
        }
        if (distance <= nearestDistance) {
          nearest = index;
          nearestDistance = distance;
        }
      }
    }
  }
  return covering >= 0 ? covering : nearest;
}

// Draw the map at the canvas' current size. Sets data-points to the number of dots drawn, 0 while the
// canvas has no size (for instance inside a hidden element), and draws again once it has one.
function renderMap(canvas) {
  const state = mapStates.get(canvas);
  const ratio = window.devicePixelRatio || 1;
  const pixels = Math.round(Math.min(canvas.clientWidth, canvas.clientHeight) * ratio);
  // Setting the size clears the canvas, even to the same value.
  canvas.width = pixels;
  canvas.height = pixels;
  state.renderedPixels = pixels;
  $(".map-tooltip", canvas.parentElement).hidden = true;
  if (pixels === 0) {
    canvas.dataset.points = "0";
    return;
  }

  const context = canvas.getContext("2d");
  const scale = pixels / MAP_SIZE;
  context.setTransform(scale, 0, 0, scale, 0, 0);
  drawAxisLabels(context, getComputedStyle(canvas).color);

  const { xs, ys, radius } = state.layout;
  const colours = state.mode === "cluster" ? state.layout.clusterColours : state.layout.positionColours;
  // One path per colour, because one fill per dot is what makes tens of thousands of dots slow. Dots
  // of a later colour cover those of an earlier one, and drawRank records that order for hovering.
  const batches = new Map();
  colours.forEach((colour, index) => {
    const batch = batches.get(colour);
    if (batch) {
      batch.push(index);
    } else {
      batches.set(colour, [index]);
    }
  });
  // Outlines help to tell large dots apart, but would turn dense maps of small dots grey.
  const outlined = radius >= 2.5;
  context.lineWidth = 0.5;
  context.strokeStyle = POINT_OUTLINE;
  let rank = 0;
  for (const [colour, indices] of batches) {
    context.beginPath();
    for (const index of indices) {
      context.moveTo(xs[index] + radius, ys[index]);
      context.arc(xs[index], ys[index], radius, 0, 2 * Math.PI);
      state.drawRank[index] = rank;
      rank += 1;
    }
    context.fillStyle = colour;
    context.fill();
    if (outlined) {
      context.stroke();
    }
  }
  canvas.dataset.points = String(xs.length);
}

function drawAxisLabels(context, colour) {
  context.fillStyle = colour;
  context.font = "11px system-ui, sans-serif";
  context.textAlign = "center";
  context.fillText("PC 1", MAP_SIZE / 2, MAP_SIZE - 5);
  context.save();
  context.translate(10, MAP_SIZE / 2);
  context.rotate(-Math.PI / 2);
  context.fillText("PC 2", 0, 0);
  context.restore();
}

// Redraw a map when its size in device pixels changes: a resized window, a zoom or another screen.
function observeMapSize(canvas) {
  if (mapResizeObserver === null) {
    mapResizeObserver = new ResizeObserver((entries) => {
      for (const entry of entries) {
        const state = mapStates.get(entry.target);
        const pixels = Math.round(Math.min(entry.target.clientWidth, entry.target.clientHeight) * (window.devicePixelRatio || 1));
        if (state && pixels !== state.renderedPixels) {
          renderMap(entry.target);
        }
      }
    });
  }
  try {
    // This box also reports a zoom, which changes the device pixels but not the CSS size.
    mapResizeObserver.observe(canvas, { box: "device-pixel-content-box" });
  } catch (unsupported) {
    // A browser that does not support that box raises a TypeError here, and gets size changes only.
    mapResizeObserver.observe(canvas);
  }
}

function showPointTooltip(canvas, event) {
  const state = mapStates.get(canvas);
  const tooltip = $(".map-tooltip", canvas.parentElement);
  const width = canvas.clientWidth;
  if (!state || width === 0) {
    return;
  }
  const bounds = canvas.getBoundingClientRect();
  const x = ((event.clientX - bounds.left - canvas.clientLeft) * MAP_SIZE) / width;
  const y = ((event.clientY - bounds.top - canvas.clientTop) * MAP_SIZE) / width;
  const index = pointAt(state, x, y);
  if (index < 0) {
    tooltip.hidden = true;
    return;
  }
  const point = state.layout.points[index];
  tooltip.textContent = `patch at level-0 (${point.px}, ${point.py}), cluster ${point.cluster}`;
  // Beside the pointer, on the side of the map's centre, so the tooltip stays over the map.
  const left = event.clientX - bounds.left;
  tooltip.style.left = left <= bounds.width / 2 ? `${left + 12}px` : "";
  tooltip.style.right = left <= bounds.width / 2 ? "" : `${bounds.width - left + 12}px`;
  tooltip.style.top = `${event.clientY - bounds.top + 12}px`;
  tooltip.hidden = false;
}

function setUpMapTooltip(canvas) {
  canvas.addEventListener("pointermove", (event) => showPointTooltip(canvas, event));
  // A touch gives no hover, so a tap shows the patch under the finger.
  canvas.addEventListener("pointerdown", (event) => showPointTooltip(canvas, event));
  canvas.addEventListener("pointerleave", () => {
    $(".map-tooltip", canvas.parentElement).hidden = true;
  });
}

function drawMap(card, map) {
  const canvas = $(".map", card);
  const points = map.points || [];
  const layout = layOutMap(points);
  mapStates.set(canvas, { layout, mode: "position", drawRank: new Int32Array(points.length), renderedPixels: -1 });
  canvas.setAttribute(
    "aria-label",
    `Map of ${points.length} patch embeddings: the first two components by ${(map.method || "pca").toUpperCase()}, ${map.clusters} clusters`,
  );
  setUpMapTooltip(canvas);
  observeMapSize(canvas);

  const radios = card.querySelectorAll(".colour-toggle input");
  for (const radio of radios) {
    radio.name = `${card.id}-colour`;
    radio.addEventListener("change", () => colourMap(card, radio.value));
  }
  colourMap(card, "position");
  card.dataset.map = "drawn";
}

function colourMap(card, mode) {
  const canvas = $(".map", card);
  mapStates.get(canvas).mode = mode;
  renderMap(canvas);
  const caption = $(".map-caption", card);
  caption.textContent =
    mode === "cluster"
      ? "Colour: the patch's KMeans cluster."
      : "Colour: hue from the patch's left-to-right position on the slide, lightness from top to bottom.";
  card.dataset.colour = mode;
}
