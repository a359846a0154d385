// Each plot is an SVG drawn by the node (no chart library, nothing fetched from elsewhere).
const PLOTS = {
  "scatter": "X-ray age against chronological age",
  "bland-altman": "Bland-Altman plot",
  "gaps": "Age-gap distribution",
  "per-day": "Images per day by state",
  "agreement": "Agreement per month",
};
login(async () => {
  const images = await Promise.all(Object.entries(PLOTS).map(async ([name, title]) => {
    const img = document.createElement("img");
    img.src = URL.createObjectURL(await (await fetchAuthorised("/dashboard/" + name + ".svg")).blob());
    img.alt = title; img.id = "plot-" + name;
    return img;
  }));
  document.getElementById("plots").replaceChildren(...images);
  const v = await api("/api/validation");
  showUntrained(v.model.untrained);
  const all = v.rolling.find((a) => a.group === "all");
  const f = (x) => x === null || x === undefined ? "-" : x.toFixed(2);
  const parts = all ? [`last ${v.window_days} days: ${all.images} images of ${all.patients} patients`, `MAE ${f(all.mae)} years`,
                       `bias ${f(all.bias)}`, `r ${f(all.r)}`] : [`no patients with a known age in the last ${v.window_days} days`];
  if (v.reference.mae !== null) parts.push(`stated MAE ${v.reference.mae} (${v.reference.set})`);
  document.getElementById("validation").replaceChildren(...parts.map((t) => {
    const s = document.createElement("span"); s.textContent = t; return s; }));
  // Each shadow model against the live one, on the images both analysed.
  document.getElementById("comparisons").replaceChildren(...v.comparisons.map((c) => {
    const p = document.createElement("p");
    const ci = c.ci95 ? ` (95 % CI ${f(c.ci95[0])} to ${f(c.ci95[1])}, by patient)` : "";
    p.textContent = c.images ? `shadow ${c.candidate} vs live ${c.reference}, same ${c.images} images of ` +
      `${c.patients} patients: MAE ${f(c.mae_candidate)} vs ${f(c.mae_reference)} years, difference ` +
      `${f(c.difference)}${ci}` : `shadow ${c.candidate}: no image analysed by both models yet`;
    return p;
  }));
});
