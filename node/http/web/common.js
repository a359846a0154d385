// Shared by the node's pages. The token stays in this tab's session storage; every request
// sends it as a bearer token.
async function fetchAuthorised(path) {
  const r = await fetch(path, {headers: {Authorization: "Bearer " + sessionStorage.getItem("token")}});
  if (!r.ok) throw new Error(r.status === 401 ? "token not accepted" : "HTTP " + r.status);
  return r;
}
async function api(path) {
  return (await fetchAuthorised(path)).json();
}
// The login form (#login, #token, #error) shows #content through show(), which may throw.
function login(show) {
  async function run() {
    try {
      await show();
      document.getElementById("error").textContent = "";
      document.getElementById("content").hidden = false;
    } catch (e) {
      document.getElementById("error").textContent = e.message;
    }
  }
  document.getElementById("login").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem("token", document.getElementById("token").value);
    run();
  });
  if (sessionStorage.getItem("token")) run();
}
// The banner (#untrained) over numbers from untrained weights: they must never look real.
function showUntrained(untrained) {
  document.getElementById("untrained").hidden = !untrained;
}
