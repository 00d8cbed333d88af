// Switchboard chat page: replaced by the full client (issue 6).
document.getElementById("app").textContent = "Switchboard";
