// A small WebGL2 scene of boxes for the 3-D view: every box is an instance of one unit cube, so the whole
// model is two draw calls (the panels, and the bars of the followed token). A box's front and back faces
// show a rectangle of one texture atlas; an orbit camera; ray picking; points projected to the page.
"use strict";

// ------------------------------------------------------------------ 4x4 matrices (column-major)
const M4 = {
  perspective(fovy, aspect, near, far) {
    const f = 1 / Math.tan(fovy / 2), nf = 1 / (near - far);
    return [f / aspect, 0, 0, 0, 0, f, 0, 0, 0, 0, (far + near) * nf, -1, 0, 0, 2 * far * near * nf, 0];
  },
  lookAt(eye, target, up) {
    const z = V3.norm(V3.sub(eye, target)), x = V3.norm(V3.cross(up, z)), y = V3.cross(z, x);
    return [x[0], y[0], z[0], 0, x[1], y[1], z[1], 0, x[2], y[2], z[2], 0,
      -V3.dot(x, eye), -V3.dot(y, eye), -V3.dot(z, eye), 1];
  },
  multiply(a, b) {
    const out = new Array(16);
    for (let c = 0; c < 4; c++) {
      for (let r = 0; r < 4; r++) {
        let s = 0;
        for (let k = 0; k < 4; k++) s += a[k * 4 + r] * b[c * 4 + k];
        out[c * 4 + r] = s;
      }
    }
    return out;
  },
  invert(m) {
    // Cofactor expansion: small, exact enough for picking rays.
    const inv = new Array(16);
    inv[0] = m[5] * m[10] * m[15] - m[5] * m[11] * m[14] - m[9] * m[6] * m[15] + m[9] * m[7] * m[14] + m[13] * m[6] * m[11] - m[13] * m[7] * m[10];
    inv[4] = -m[4] * m[10] * m[15] + m[4] * m[11] * m[14] + m[8] * m[6] * m[15] - m[8] * m[7] * m[14] - m[12] * m[6] * m[11] + m[12] * m[7] * m[10];
    inv[8] = m[4] * m[9] * m[15] - m[4] * m[11] * m[13] - m[8] * m[5] * m[15] + m[8] * m[7] * m[13] + m[12] * m[5] * m[11] - m[12] * m[7] * m[9];
    inv[12] = -m[4] * m[9] * m[14] + m[4] * m[10] * m[13] + m[8] * m[5] * m[14] - m[8] * m[6] * m[13] - m[12] * m[5] * m[10] + m[12] * m[6] * m[9];
    inv[1] = -m[1] * m[10] * m[15] + m[1] * m[11] * m[14] + m[9] * m[2] * m[15] - m[9] * m[3] * m[14] - m[13] * m[2] * m[11] + m[13] * m[3] * m[10];
    inv[5] = m[0] * m[10] * m[15] - m[0] * m[11] * m[14] - m[8] * m[2] * m[15] + m[8] * m[3] * m[14] + m[12] * m[2] * m[11] - m[12] * m[3] * m[10];
    inv[9] = -m[0] * m[9] * m[15] + m[0] * m[11] * m[13] + m[8] * m[1] * m[15] - m[8] * m[3] * m[13] - m[12] * m[1] * m[11] + m[12] * m[3] * m[9];
    inv[13] = m[0] * m[9] * m[14] - m[0] * m[10] * m[13] - m[8] * m[1] * m[14] + m[8] * m[2] * m[13] + m[12] * m[1] * m[10] - m[12] * m[2] * m[9];
    inv[2] = m[1] * m[6] * m[15] - m[1] * m[7] * m[14] - m[5] * m[2] * m[15] + m[5] * m[3] * m[14] + m[13] * m[2] * m[7] - m[13] * m[3] * m[6];
    inv[6] = -m[0] * m[6] * m[15] + m[0] * m[7] * m[14] + m[4] * m[2] * m[15] - m[4] * m[3] * m[14] - m[12] * m[2] * m[7] + m[12] * m[3] * m[6];
    inv[10] = m[0] * m[5] * m[15] - m[0] * m[7] * m[13] - m[4] * m[1] * m[15] + m[4] * m[3] * m[13] + m[12] * m[1] * m[7] - m[12] * m[3] * m[5];
    inv[14] = -m[0] * m[5] * m[14] + m[0] * m[6] * m[13] + m[4] * m[1] * m[14] - m[4] * m[2] * m[13] - m[12] * m[1] * m[6] + m[12] * m[2] * m[5];
    inv[3] = -m[1] * m[6] * m[11] + m[1] * m[7] * m[10] + m[5] * m[2] * m[11] - m[5] * m[3] * m[10] - m[9] * m[2] * m[7] + m[9] * m[3] * m[6];
    inv[7] = m[0] * m[6] * m[11] - m[0] * m[7] * m[10] - m[4] * m[2] * m[11] + m[4] * m[3] * m[10] + m[8] * m[2] * m[7] - m[8] * m[3] * m[6];
    inv[11] = -m[0] * m[5] * m[11] + m[0] * m[7] * m[9] + m[4] * m[1] * m[11] - m[4] * m[3] * m[9] - m[8] * m[1] * m[7] + m[8] * m[3] * m[5];
    inv[15] = m[0] * m[5] * m[10] - m[0] * m[6] * m[9] - m[4] * m[1] * m[10] + m[4] * m[2] * m[9] + m[8] * m[1] * m[6] - m[8] * m[2] * m[5];
    const det = m[0] * inv[0] + m[1] * inv[4] + m[2] * inv[8] + m[3] * inv[12];
    return inv.map((v) => v / det);
  },
  apply(m, p) {
    const [x, y, z] = p;
    const w = m[3] * x + m[7] * y + m[11] * z + m[15];
    return [(m[0] * x + m[4] * y + m[8] * z + m[12]) / w, (m[1] * x + m[5] * y + m[9] * z + m[13]) / w,
      (m[2] * x + m[6] * y + m[10] * z + m[14]) / w, w];
  },
};

const V3 = {
  add: (a, b) => [a[0] + b[0], a[1] + b[1], a[2] + b[2]],
  sub: (a, b) => [a[0] - b[0], a[1] - b[1], a[2] - b[2]],
  scale: (a, s) => [a[0] * s, a[1] * s, a[2] * s],
  dot: (a, b) => a[0] * b[0] + a[1] * b[1] + a[2] * b[2],
  cross: (a, b) => [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]],
  norm: (a) => V3.scale(a, 1 / (Math.hypot(a[0], a[1], a[2]) || 1)),
};

// ------------------------------------------------------------------ texture atlas
/** Small RGBA images packed on shelves into one texture; `add` returns the image's rectangle in texels. */
class Atlas {
  constructor(width = 2048) {
    this.width = width;
    this.images = [];
    this.x = 0;
    this.y = 0;
    this.shelf = 0;
  }

  add(w, h, pixels) {
    if (this.x + w + 1 > this.width) {
      this.x = 0;
      this.y += this.shelf + 1;
      this.shelf = 0;
    }
    const rect = { x: this.x, y: this.y, w, h };
    this.images.push({ rect, pixels });
    this.x += w + 1; // a texel of space: nearest sampling never reads a neighbour
    this.shelf = Math.max(this.shelf, h);
    return rect;
  }

  /** One RGBA8 texture of every image; `uv(rect)` is then the rectangle in 0..1, inset half a texel. */
  upload(gl) {
    this.height = Math.max(1, this.y + this.shelf);
    const data = new Uint8Array(this.width * this.height * 4);
    for (const { rect, pixels } of this.images) {
      for (let r = 0; r < rect.h; r++) {
        data.set(pixels.subarray(r * rect.w * 4, (r + 1) * rect.w * 4), ((rect.y + r) * this.width + rect.x) * 4);
      }
    }
    const texture = gl.createTexture();
    gl.bindTexture(gl.TEXTURE_2D, texture);
    gl.pixelStorei(gl.UNPACK_ALIGNMENT, 1);
    gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGBA8, this.width, this.height, 0, gl.RGBA, gl.UNSIGNED_BYTE, data);
    for (const [key, value] of [[gl.TEXTURE_MIN_FILTER, gl.NEAREST], [gl.TEXTURE_MAG_FILTER, gl.NEAREST],
      [gl.TEXTURE_WRAP_S, gl.CLAMP_TO_EDGE], [gl.TEXTURE_WRAP_T, gl.CLAMP_TO_EDGE]]) {
      gl.texParameteri(gl.TEXTURE_2D, key, value);
    }
    return texture;
  }

  uv(rect) {
    return [(rect.x + 0.01) / this.width, (rect.y + 0.01) / this.height,
      (rect.x + rect.w - 0.01) / this.width, (rect.y + rect.h - 0.01) / this.height];
  }
}

// ------------------------------------------------------------------ shaders
const VERTEX_SHADER = `#version 300 es
in vec3 a_vertex;
in vec3 a_normal;
in vec2 a_uv;
in vec3 i_center;
in vec3 i_size;
in vec4 i_rect;
in vec4 i_color;
in vec4 i_info;
uniform mat4 u_viewProj;
out vec2 v_uv;
out vec3 v_normal;
out vec4 v_color;
out vec4 v_rect;
flat out vec4 v_info;
void main() {
  gl_Position = u_viewProj * vec4(i_center + a_vertex * i_size, 1.0);
  v_uv = a_uv;
  v_normal = a_normal;
  v_color = i_color;
  v_rect = i_rect;
  v_info = i_info;
}`;

// i_info: x the step that computes the box (-1: always lit), y the token rows of its texture (0: none),
// z which faces show the texture (0 none, 1 front and back, 2 top and bottom), w 1 for a bar.
const FRAGMENT_SHADER = `#version 300 es
precision highp float;
in vec2 v_uv;
in vec3 v_normal;
in vec4 v_color;
in vec4 v_rect;
flat in vec4 v_info;
uniform sampler2D u_atlas;
uniform float u_step;
uniform float u_reveal;
uniform float u_follow;
uniform vec3 u_background;
out vec4 colour;
void main() {
  bool face = v_info.z > 1.5 ? abs(v_normal.y) > 0.5 : abs(v_normal.z) > 0.5;
  vec3 c = v_color.rgb;
  float rows = v_info.y;
  float row = floor(v_uv.y * rows);
  if (face && v_info.z > 0.5) {
    c = texture(u_atlas, mix(v_rect.xy, v_rect.zw, v_uv)).rgb;
    if (rows > 0.0 && row == u_follow) {  // the followed token: a dark frame round its row
      float edge = min(fract(v_uv.y * rows), 1.0 - fract(v_uv.y * rows)) / fwidth(v_uv.y * rows);
      float side = min(v_uv.x, 1.0 - v_uv.x) / fwidth(v_uv.x);
      if (edge < 1.5 || side < 1.5) c = vec3(0.07, 0.09, 0.16);
    }
  }
  float light = 0.72 + 0.28 * max(dot(normalize(v_normal), normalize(vec3(0.35, 0.6, 1.0))), 0.0);
  c *= light;
  if (u_step >= 0.0 && v_info.x >= 0.0) {
    if (v_info.x > u_step) c = mix(c, u_background, 0.86);          // not computed yet: a ghost
    else if (v_info.x == u_step && rows > 0.0 && row >= u_reveal) c = mix(c, u_background, 0.7);  // rows to come
    else if (v_info.x == u_step && v_info.w > 0.5 && u_follow >= u_reveal) c = mix(c, u_background, 0.86);
  }
  colour = vec4(c, 1.0);
}`;

// A unit cube: 6 faces x 2 triangles, positions in -0.5..0.5, uv with v = 0 at the top (texture row 0).
function cubeVertices() {
  const faces = [
    [[0, 0, 1], [1, 0, 0], [0, 1, 0]], [[0, 0, -1], [-1, 0, 0], [0, 1, 0]],
    [[1, 0, 0], [0, 0, -1], [0, 1, 0]], [[-1, 0, 0], [0, 0, 1], [0, 1, 0]],
    [[0, 1, 0], [1, 0, 0], [0, 0, -1]], [[0, -1, 0], [1, 0, 0], [0, 0, 1]],
  ];
  const out = [];
  for (const [n, u, v] of faces) {
    const corner = (a, b) => [0.5 * n[0] + a * u[0] + b * v[0], 0.5 * n[1] + a * u[1] + b * v[1], 0.5 * n[2] + a * u[2] + b * v[2]];
    for (const [a, b] of [[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]) {
      out.push(...corner(a, b), ...n, a + 0.5, 0.5 - b);
    }
  }
  return new Float32Array(out);
}

const INSTANCE_FLOATS = 18; // center 3, size 3, rect 4, colour 4, info 4

function compile(gl, type, source) {
  const shader = gl.createShader(type);
  gl.shaderSource(shader, source);
  gl.compileShader(shader);
  if (!gl.getShaderParameter(shader, gl.COMPILE_STATUS)) throw new Error(gl.getShaderInfoLog(shader));
  return shader;
}

// ------------------------------------------------------------------ the scene
/**
 * Boxes: `{center, size, rect (atlas uv or null), top (the texture on the top face), color [r,g,b] 0..1, step,
 * rows, bar}`. `setBoxes(panels)`
 * once, `setBars(bars)` whenever the followed token or the step changes, `render()` draws when asked.
 */
class Scene {
  constructor(canvas, { background = [0.93, 0.945, 0.96], onPick = null, onFrame = null } = {}) {
    const gl = canvas.getContext("webgl2", { antialias: true });
    if (!gl) throw new Error("this browser has no WebGL2: the 3-D view needs it");
    this.gl = gl;
    this.canvas = canvas;
    this.background = background;
    this.onPick = onPick;
    this.onFrame = onFrame;
    this.uniforms = { step: -1, reveal: 0, follow: -1 };
    this.camera = { target: [0, 0, 0], distance: 100, yaw: -0.5, pitch: 0.3, fovy: 0.8 };
    this.boxes = [];
    this.counts = { panels: 0, bars: 0 };
    this.pending = false;
    this.program = gl.createProgram();
    gl.attachShader(this.program, compile(gl, gl.VERTEX_SHADER, VERTEX_SHADER));
    gl.attachShader(this.program, compile(gl, gl.FRAGMENT_SHADER, FRAGMENT_SHADER));
    gl.linkProgram(this.program);
    if (!gl.getProgramParameter(this.program, gl.LINK_STATUS)) throw new Error(gl.getProgramInfoLog(this.program));
    this.cube = gl.createBuffer();
    gl.bindBuffer(gl.ARRAY_BUFFER, this.cube);
    gl.bufferData(gl.ARRAY_BUFFER, cubeVertices(), gl.STATIC_DRAW);
    this.vaos = { panels: this.instanceVao(), bars: this.instanceVao() };
    this.listen();
    new ResizeObserver(() => this.render()).observe(canvas);
  }

  instanceVao() {
    const gl = this.gl, p = this.program;
    const vao = gl.createVertexArray();
    gl.bindVertexArray(vao);
    gl.bindBuffer(gl.ARRAY_BUFFER, this.cube);
    for (const [name, size, offset] of [["a_vertex", 3, 0], ["a_normal", 3, 3], ["a_uv", 2, 6]]) {
      const loc = gl.getAttribLocation(p, name);
      gl.enableVertexAttribArray(loc);
      gl.vertexAttribPointer(loc, size, gl.FLOAT, false, 32, offset * 4);
    }
    const buffer = gl.createBuffer();
    gl.bindBuffer(gl.ARRAY_BUFFER, buffer);
    let offset = 0;
    for (const [name, size] of [["i_center", 3], ["i_size", 3], ["i_rect", 4], ["i_color", 4], ["i_info", 4]]) {
      const loc = gl.getAttribLocation(p, name);
      gl.enableVertexAttribArray(loc);
      gl.vertexAttribPointer(loc, size, gl.FLOAT, false, INSTANCE_FLOATS * 4, offset * 4);
      gl.vertexAttribDivisor(loc, 1);
      offset += size;
    }
    gl.bindVertexArray(null);
    return { vao, buffer };
  }

  upload(which, boxes) {
    const data = new Float32Array(boxes.length * INSTANCE_FLOATS);
    boxes.forEach((b, i) => {
      const rect = b.rect || [0, 0, 0, 0];
      const c = b.color || [0.8, 0.8, 0.8];
      data.set([...b.center, ...b.size, ...rect, c[0], c[1], c[2], 1,
        b.step ?? -1, b.rows || 0, b.rect ? (b.top ? 2 : 1) : 0, b.bar ? 1 : 0], i * INSTANCE_FLOATS);
    });
    const gl = this.gl;
    gl.bindBuffer(gl.ARRAY_BUFFER, this.vaos[which].buffer);
    gl.bufferData(gl.ARRAY_BUFFER, data, gl.DYNAMIC_DRAW);
    this.counts[which] = boxes.length;
  }

  /** The pickable boxes and the atlas their faces read. */
  setBoxes(boxes, atlas) {
    this.boxes = boxes;
    this.texture = atlas.upload(this.gl);
    boxes.forEach((b) => { if (b.image) b.rect = atlas.uv(b.image); });
    this.upload("panels", boxes);
    this.render();
  }

  setBars(bars) {
    this.upload("bars", bars);
    this.render();
  }

  set(uniforms) {
    Object.assign(this.uniforms, uniforms);
    this.render();
  }

  // ---------------------------------------------------------------- camera
  eye() {
    const c = this.camera;
    const offset = [Math.cos(c.pitch) * Math.sin(c.yaw), Math.sin(c.pitch), Math.cos(c.pitch) * Math.cos(c.yaw)];
    return V3.add(c.target, V3.scale(offset, c.distance));
  }

  viewProj() {
    const c = this.camera, aspect = this.canvas.width / Math.max(1, this.canvas.height);
    const proj = M4.perspective(c.fovy, aspect, c.distance / 200, c.distance * 50);
    return M4.multiply(proj, M4.lookAt(this.eye(), c.target, [0, 1, 0]));
  }

  /** Glide the camera to `to` (any of target, distance, yaw, pitch) in `ms`. */
  moveTo(to, ms = 450) {
    const from = { ...this.camera, target: [...this.camera.target] };
    const start = performance.now();
    this.glide = (now) => {
      const t = Math.min(1, (now - start) / ms), e = t * t * (3 - 2 * t);
      for (const key of ["distance", "yaw", "pitch"]) if (key in to) this.camera[key] = from[key] + (to[key] - from[key]) * e;
      if (to.target) this.camera.target = from.target.map((v, i) => v + (to.target[i] - v) * e);
      return t < 1;
    };
    this.render();
  }

  /** Where the camera looks at the box `lo`..`hi` from, so that the whole box is in view (with a margin). */
  frame(lo, hi, margin = 1.15) {
    const aspect = this.canvas.clientWidth / Math.max(1, this.canvas.clientHeight), t = Math.tan(this.camera.fovy / 2);
    const half = V3.scale(V3.sub(hi, lo), 0.5);
    const distance = Math.max(half[1] / t, half[0] / (t * aspect), Math.hypot(...half) * 0.6) * margin + half[2];
    return { target: V3.scale(V3.add(lo, hi), 0.5), distance };
  }

  /** A point of the scene in CSS pixels of the canvas (null behind the camera). */
  project(point, viewProj = this.viewProj()) {
    const [x, y, , w] = M4.apply(viewProj, point);
    if (w <= 0) return null;
    return [(x + 1) / 2 * this.canvas.clientWidth, (1 - y) / 2 * this.canvas.clientHeight];
  }

  /** The nearest pickable box under CSS pixel (x, y), or null. */
  pick(x, y) {
    const inv = M4.invert(this.viewProj());
    const nx = x / this.canvas.clientWidth * 2 - 1, ny = 1 - y / this.canvas.clientHeight * 2;
    const near = M4.apply(inv, [nx, ny, -1]), far = M4.apply(inv, [nx, ny, 1]);
    const origin = near.slice(0, 3), dir = V3.sub(far.slice(0, 3), origin);
    let best = null, bestT = Infinity;
    for (const box of this.boxes) {
      if (!box.pickable) continue;
      let t0 = -Infinity, t1 = Infinity;
      for (let a = 0; a < 3; a++) {
        const lo = box.center[a] - box.size[a] / 2, hi = box.center[a] + box.size[a] / 2;
        if (Math.abs(dir[a]) < 1e-12) {
          if (origin[a] < lo || origin[a] > hi) { t0 = Infinity; break; }
          continue;
        }
        let ta = (lo - origin[a]) / dir[a], tb = (hi - origin[a]) / dir[a];
        if (ta > tb) [ta, tb] = [tb, ta];
        t0 = Math.max(t0, ta);
        t1 = Math.min(t1, tb);
      }
      if (t0 <= t1 && t1 >= 0 && t0 < bestT) {
        bestT = t0;
        best = box;
      }
    }
    return best;
  }

  // ---------------------------------------------------------------- input
  listen() {
    const canvas = this.canvas;
    let drag = null;
    canvas.addEventListener("pointerdown", (e) => {
      drag = { x: e.clientX, y: e.clientY, moved: 0, pan: e.button !== 0 || e.shiftKey || e.ctrlKey };
      canvas.setPointerCapture(e.pointerId);
    });
    canvas.addEventListener("pointermove", (e) => {
      if (!drag) return;
      const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
      drag.x = e.clientX;
      drag.y = e.clientY;
      drag.moved += Math.abs(dx) + Math.abs(dy);
      if (drag.pan) this.pan(dx, dy);
      else this.rotate(dx, dy);
    });
    canvas.addEventListener("pointerup", (e) => {
      if (drag && drag.moved < 4 && this.onPick) {
        const r = canvas.getBoundingClientRect();
        this.onPick(this.pick(e.clientX - r.left, e.clientY - r.top));
      }
      drag = null;
    });
    canvas.addEventListener("contextmenu", (e) => e.preventDefault());
    canvas.addEventListener("wheel", (e) => {
      e.preventDefault();
      this.zoom(Math.exp(e.deltaY * 0.0015));
    }, { passive: false });
    canvas.addEventListener("keydown", (e) => {
      const step = 24;
      const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
      if (moves[e.key]) (e.shiftKey ? this.pan : this.rotate).apply(this, moves[e.key]);
      else if (e.key === "+" || e.key === "=") this.zoom(0.8);
      else if (e.key === "-") this.zoom(1.25);
      else return;
      e.preventDefault();
    });
  }

  rotate(dx, dy) {
    this.camera.yaw -= dx * 0.006;
    this.camera.pitch = Math.max(-1.5, Math.min(1.5, this.camera.pitch + dy * 0.006));
    this.glide = null;
    this.render();
  }

  pan(dx, dy) {
    const vp = this.viewProj();
    const right = V3.norm([vp[0], vp[4], vp[8]]), up = V3.norm([vp[1], vp[5], vp[9]]);
    const k = this.camera.distance * 0.0015;
    this.camera.target = V3.add(this.camera.target, V3.add(V3.scale(right, -dx * k), V3.scale(up, dy * k)));
    this.glide = null;
    this.render();
  }

  zoom(factor) {
    this.camera.distance = Math.max(2, Math.min(1e6, this.camera.distance * factor));
    this.glide = null;
    this.render();
  }

  // ---------------------------------------------------------------- drawing
  /** Draw on the next animation frame (once, however often it is asked). */
  render() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame((now) => {
      this.pending = false;
      if (this.glide && this.glide(now)) this.render();
      else this.glide = null;
      if (this.animate && this.animate(now)) this.render();
      this.draw();
    });
  }

  draw() {
    const gl = this.gl, canvas = this.canvas, dpr = window.devicePixelRatio || 1;
    const width = Math.round(canvas.clientWidth * dpr), height = Math.round(canvas.clientHeight * dpr);
    if (canvas.width !== width || canvas.height !== height) {
      canvas.width = width;
      canvas.height = height;
    }
    gl.viewport(0, 0, width, height);
    gl.clearColor(...this.background, 1);
    gl.clear(gl.COLOR_BUFFER_BIT | gl.DEPTH_BUFFER_BIT);
    gl.enable(gl.DEPTH_TEST);
    gl.enable(gl.CULL_FACE);
    gl.useProgram(this.program);
    const vp = this.viewProj();
    const u = (name) => gl.getUniformLocation(this.program, name);
    gl.uniformMatrix4fv(u("u_viewProj"), false, vp);
    gl.uniform1f(u("u_step"), this.uniforms.step);
    gl.uniform1f(u("u_reveal"), this.uniforms.reveal);
    gl.uniform1f(u("u_follow"), this.uniforms.follow);
    gl.uniform3fv(u("u_background"), this.background);
    gl.activeTexture(gl.TEXTURE0);
    gl.bindTexture(gl.TEXTURE_2D, this.texture || null);
    gl.uniform1i(u("u_atlas"), 0);
    for (const which of ["panels", "bars"]) {
      if (!this.counts[which]) continue;
      gl.bindVertexArray(this.vaos[which].vao);
      gl.drawArraysInstanced(gl.TRIANGLES, 0, 36, this.counts[which]);
    }
    gl.bindVertexArray(null);
    this.frames = (this.frames || 0) + 1;
    if (this.onFrame) this.onFrame(vp);
  }
}
