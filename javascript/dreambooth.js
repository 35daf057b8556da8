// The DreamBooth tab in the page: buttons that follow the run's state, marked fields, messages that give way to the
// run's real state, and a "Use in txt2img" button beside each checkpoint.
//
// The webui injects this file into its page; the standalone app runs it once the page has loaded. Inside the webui
// it uses the webui's own helpers (A1111 1.10 and Forge define them as globals in script.js and javascript/ui.js):
// gradioApp, onUiUpdate, switch_to_txt2img, selectCheckpoint, updateInput. Each is looked up through webui() only;
// where one is missing (the standalone app, another webui) the feature that needs it does nothing and its buttons
// stay hidden.
(function () {
    "use strict";
    if (window.dreambooth) {
        return; // already loaded
    }

    // The webui's helpers this file may call, and nothing else of the webui's.
    var WEBUI_HELPERS = ["gradioApp", "onUiUpdate", "switch_to_txt2img", "selectCheckpoint", "updateInput"];

    function webui(name) {
        if (WEBUI_HELPERS.indexOf(name) < 0) {
            throw new Error("dreambooth.js: " + name + " is not a webui helper this file may use");
        }
        var helper = window[name];
        return typeof helper === "function" ? helper : null;
    }

    function app() {
        var getApp = webui("gradioApp");
        try {
            return (getApp && getApp()) || document;
        } catch (e) {
            return document;
        }
    }

    function byId(id) {
        return app().querySelector("#" + id) || document.getElementById(id);
    }

    function promptBox() {
        return app().querySelector("#txt2img_prompt textarea");
    }

    function hasTxt2img() {
        return !!(byId("tab_txt2img") && webui("switch_to_txt2img"));
    }

    // What each kind of "Use in txt2img" button needs from the page.
    function canUse(button) {
        if (!hasTxt2img()) {
            return false;
        }
        if (button.hasAttribute("data-db-lora")) {
            return !!(promptBox() && webui("updateInput"));
        }
        return !!webui("selectCheckpoint");
    }

    function useCheckpoint(title) {
        if (!hasTxt2img() || !webui("selectCheckpoint")) {
            return false;
        }
        webui("switch_to_txt2img")();
        webui("selectCheckpoint")(title);
        return true;
    }

    function useLora(tag) {
        var box = promptBox();
        if (!hasTxt2img() || !box || !webui("updateInput")) {
            return false;
        }
        webui("switch_to_txt2img")();
        if (box.value.indexOf(tag) < 0) {
            box.value = box.value.trim() ? box.value.replace(/\s+$/, "") + " " + tag : tag;
            webui("updateInput")(box);
        }
        return true;
    }

    function setDisabled(id, disabled) {
        var button = byId(id);
        if (button && button.disabled !== disabled) {
            button.disabled = disabled;
        }
    }

    // Runs on every change of the page: cheap, and it only writes what differs.
    function sync() {
        var progress = byId("db_progress");
        if (!progress) {
            return;
        }
        var state = progress.getAttribute("data-state") || "none";
        var active = state === "running" || state === "starting" || state === "paused";
        setDisabled("db_train", active || state === "none"); // "none": no model selected yet
        ["db_pause", "db_cancel", "db_save_now", "db_sample_now"].forEach(function (id) {
            setDisabled(id, !active);
        });
        var pause = byId("db_pause");
        var label = state === "paused" ? "Resume" : "Pause";
        if (pause && pause.textContent.trim() !== label) {
            pause.textContent = label;
        }
        // A message about the run ("Training started", "Cancel requested") gives way once the run has moved on.
        app().querySelectorAll("#db_run_message [data-state]").forEach(function (message) {
            var stale = message.getAttribute("data-state") !== state;
            if (message.hidden !== stale) {
                message.hidden = stale;
            }
        });
        // The fields the shown errors are about are marked; the others not.
        var marked = {};
        app().querySelectorAll(".db-error[data-fields]").forEach(function (error) {
            if (!error.hidden) {
                error.getAttribute("data-fields").split(" ").forEach(function (id) {
                    marked[id] = true;
                });
            }
        });
        app().querySelectorAll(".db-invalid").forEach(function (field) {
            if (!marked[field.id]) {
                field.classList.remove("db-invalid");
            }
        });
        Object.keys(marked).forEach(function (id) {
            var field = byId(id);
            if (field && !field.classList.contains("db-invalid")) {
                field.classList.add("db-invalid");
            }
        });
        app().querySelectorAll("button.db-use").forEach(function (button) {
            var hidden = !canUse(button);
            if (button.hidden !== hidden) {
                button.hidden = hidden;
            }
        });
    }

    function onClick(event) {
        var target = event.composedPath ? event.composedPath()[0] : event.target;
        var button = target && target.closest ? target.closest("button.db-use") : null;
        if (!button) {
            return;
        }
        event.preventDefault();
        if (button.hasAttribute("data-db-lora")) {
            useLora(button.getAttribute("data-db-lora"));
        } else {
            useCheckpoint(button.getAttribute("data-db-checkpoint"));
        }
    }

    var scheduled = false;
    function schedule() {
        if (!scheduled) {
            scheduled = true;
            window.requestAnimationFrame(function () {
                scheduled = false;
                sync();
            });
        }
    }

    document.addEventListener("click", onClick, true);
    var register = webui("onUiUpdate");
    if (register) {
        register(schedule);
    } else {
        new MutationObserver(schedule).observe(document.documentElement, {
            childList: true, subtree: true, attributes: true, attributeFilter: ["data-state", "data-fields"]
        });
    }
    schedule();

    window.dreambooth = {sync: sync, useCheckpoint: useCheckpoint, useLora: useLora, helpers: WEBUI_HELPERS};
})();
