function fill(table, rows, keys) {
  const body = document.querySelector(table + " tbody");
  body.replaceChildren();
  for (const row of rows) {
    const tr = body.insertRow();
    for (const k of keys) {
      const td = tr.insertCell();
      td.textContent = row[k] ?? "";  // text, never HTML: values come from DICOM headers
      if (k === "outcome" || k === "state") td.className = row[k];
      if (k === "failing" && row[k]) td.className = "failure";
    }
  }
}
login(async () => {
  const [inst, audit, dest] = await Promise.all(
    [api("/api/instances?limit=50"), api("/api/audit?limit=50"), api("/api/destinations")]);
  document.getElementById("counts").replaceChildren(...Object.entries(inst.counts).map(([k, v]) => {
    const s = document.createElement("span"); s.textContent = k + ": " + v; return s; }));
  showUntrained(inst.instances.some((i) => i.untrained));
  fill("#instances", inst.instances.map((i) => ({...i,
    xray_age: i.xray_age === null ? null : i.xray_age + (i.untrained ? " (untrained)" : "")})),
       ["received_at", "state", "xray_age", "reason", "origin", "patient_id", "accession_number", "sop_instance_uid"]);
  fill("#destinations", dest.destinations.map(d => ({
    name: d.name, kinds: d.kinds.join(", "), pending: d.counts.pending ?? 0, delivered: d.counts.delivered ?? 0,
    failed: d.counts.failed ?? 0, failing: d.failing ?? ""})),
       ["name", "kinds", "pending", "delivered", "failed", "failing"]);
  fill("#events", audit.events,
       ["at", "event", "outcome", "actor", "patient_id", "sop_instance_uid", "detail"]);
});
