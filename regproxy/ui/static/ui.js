// regproxy web page: the repository filter and the copy buttons. Nothing else needs script.
(function () {
  "use strict";

  function setupFilter(input) {
    var table = document.getElementById(input.getAttribute("data-filter"));
    if (!table || !table.tBodies.length) return;
    var rows = table.tBodies[0].rows;
    var count = document.getElementById("filter-count");
    function apply() {
      var words = input.value.toLowerCase().split(/\s+/).filter(Boolean);
      var shown = 0;
      for (var i = 0; i < rows.length; i++) {
        var name = rows[i].getAttribute("data-name") || "";
        var match = words.every(function (word) { return name.indexOf(word) !== -1; });
        rows[i].hidden = !match;
        if (match) shown++;
      }
      if (count) count.textContent = "Showing " + shown + " of " + rows.length;
    }
    input.addEventListener("input", apply);
    var form = input.form;
    if (form) {
      form.addEventListener("submit", function (event) {
        event.preventDefault(); // filtered already; keep the address as it is
        apply();
      });
    }
  }

  function fallbackCopy(text) {
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "offscreen";
    document.body.appendChild(area);
    area.select();
    var ok = false;
    try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
    document.body.removeChild(area);
    return ok;
  }

  function announce(button, ok, text) {
    var status = document.getElementById("copy-status");
    if (status) status.textContent = ok ? "Copied: " + text : "Could not copy. The command is: " + text;
    var label = button.getAttribute("data-label") || button.textContent;
    button.setAttribute("data-label", label);
    button.textContent = ok ? "copied" : "copy failed";
    button.classList.toggle("copied", ok);
    window.setTimeout(function () {
      button.textContent = label;
      button.classList.remove("copied");
    }, 1500);
  }

  function copy(button) {
    var text = button.getAttribute("data-copy");
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(
        function () { announce(button, true, text); },
        function () { announce(button, fallbackCopy(text), text); }
      );
    } else {
      announce(button, fallbackCopy(text), text);
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    var inputs = document.querySelectorAll("input[data-filter]");
    for (var i = 0; i < inputs.length; i++) setupFilter(inputs[i]);
    document.addEventListener("click", function (event) {
      var button = event.target.closest ? event.target.closest("button[data-copy]") : null;
      if (button) copy(button);
    });
  });
})();
