// New-job form: the RLAIF settings show only for the RLAIF method (without this script they are always shown and
// the trainer refuses them for other methods), and a refused form moves focus to its error summary.
(function () {
  "use strict";
  const method = document.getElementById("method");
  const rlaif = document.getElementById("rlaif-settings");
  function toggle() {
    const on = method.value === "rlaif";
    rlaif.hidden = !on && !rlaif.querySelector("[aria-invalid='true']");  // never hide a field that has an error
  }
  method.addEventListener("change", toggle);
  toggle();
  const summary = document.getElementById("error-summary");
  if (summary) summary.focus();
})();
