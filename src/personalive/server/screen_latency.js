() => {
  // Capture-to-screen latency of webcam frames, on the browser's clock alone (no clock sync with the server): each
  // animated <img> carries the capture time of its driving frame (data-captured), and it counts as on screen when
  // the browser has decoded it and is about to paint it (the next animation frame).
  const WINDOW = 100; // frames the percentiles cover
  const EMPTY = "latency capture→screen p50 – ms, p95 – ms (webcam only)";
  let latencies = [], lastIndex = 0;
  const write = (html) => {
    const readout = document.querySelector("#pl-screen-latency .pl-readout");
    if (readout) readout.innerHTML = html;
  };
  const record = (ms) => {
    latencies = latencies.concat(ms).slice(-WINDOW);
    const sorted = [...latencies].sort((a, b) => a - b);
    const p = (q) => sorted[Math.ceil(q * sorted.length) - 1].toFixed(0);
    write(`latency capture→screen p50 <b>${p(0.5)}</b> ms, p95 <b>${p(0.95)}</b> ms`);
  };
  // gradio may keep the <img> and update its attributes, so a new frame is a new data-frame, not a new element
  new MutationObserver(() => {
    const img = document.querySelector("#pl-output img.pl-frame");
    const index = Number(img?.dataset.frame);
    if (!img || index === lastIndex) return;
    if (index < lastIndex) { latencies = []; write(EMPTY); } // the stream restarted (or a video plays now)
    lastIndex = index;
    if (!img.dataset.captured) return; // a ramp frame, or a driving-video frame (read on the server)
    const captured = Number(img.dataset.captured);
    const painted = () => { // unless the next frame replaced it first (then it never reached the screen)
      if (Number(img.dataset.frame) === index) record(performance.timeOrigin + performance.now() - captured);
    };
    img.decode().then(() => requestAnimationFrame(painted), () => {});
  }).observe(document.body, { childList: true, subtree: true, attributes: true, attributeFilter: ["data-frame"] });
}
