// A PLC-side OPC UA client (node-opcua, an implementation independent of the agent's asyncua) that runs the
// smart-camera cycle of docs/plc.md by subscription, with no polling:
//   write TriggerId + Trigger -> notification ResultsValid=true -> read the result -> ResultsAck=true
//   -> notification ResultsValid=false -> ResultsAck=false.
// Then a trigger while busy (two triggers in one write request: the second is refused).
//
// usage: node opcua_cycle.js ENDPOINT USER PASSWORD PKI_DIR SERVER_CERT_DER FIRST_TRIGGER_ID COUNT
// Prints one JSON object per line: {"cycle": ...} per trigger, {"busy": ...}, {"counters": ...}; exit 0 on success.
"use strict";
const { DataType, AttributeIds } = require("node-opcua-client");
const { out, withSession, watch, run } = require("./opcua_session");

const [endpoint, userName, password, pkiDir, serverCert, firstId, count] = process.argv.slice(2);
const RESULT_NODES = ["ResultTriggerId", "ResultSequence", "PartId", "Status", "Pass", "Fail", "LogNfa",
    "RegionCount", "ProcessingTimeMs"];

async function main() {
    await withSession({ endpoint, userName, password, pkiDir, serverCert }, async (session, id) => {
        const { subscription, values: changes, changed } = await watch(session, id("ResultsValid"));
        async function until(value, ms) {
            const deadline = Date.now() + ms;
            for (;;) {
                const at = changes.lastIndexOf(value);
                if (at >= 0) { changes.splice(0, at + 1); return; }
                const left = deadline - Date.now();
                if (left <= 0) throw new Error(`ResultsValid never became ${value}`);
                await changed(left);
            }
        }
        async function write(values) {
            const statuses = await session.write(values.map(([name, dataType, value]) => ({
                nodeId: id(name), attributeId: AttributeIds.Value, value: { value: { dataType, value } },
            })));
            return statuses.map((s) => s.name);
        }
        await until(false, 5000); // the initial notification: no result yet

        for (let i = 0; i < Number(count); i++) {
            const triggerId = Number(firstId) + i;
            const started = process.hrtime.bigint();
            const written = await write([["TriggerId", DataType.UInt32, triggerId], ["Trigger", DataType.Boolean, true]]);
            if (written.some((s) => s !== "Good")) throw new Error(`trigger refused: ${written}`);
            await until(true, 10000);
            const validMs = Number(process.hrtime.bigint() - started) / 1e6;
            const read = await session.read(RESULT_NODES.map((name) => ({ nodeId: id(name), attributeId: AttributeIds.Value })));
            const result = Object.fromEntries(RESULT_NODES.map((name, k) => [name, read[k].value.value]));
            await write([["ResultsAck", DataType.Boolean, true]]);
            await until(false, 10000);
            await write([["ResultsAck", DataType.Boolean, false]]);
            out({ cycle: { triggerId, validMs, ...result } });
        }

        // Two triggers in one request: the second arrives while the first is being inspected.
        const busy = await write([
            ["TriggerId", DataType.UInt32, 900001], ["Trigger", DataType.Boolean, true],
            ["TriggerId", DataType.UInt32, 900002], ["Trigger", DataType.Boolean, true],
        ]);
        const lastError = await session.read({ nodeId: id("LastError"), attributeId: AttributeIds.Value });
        await until(true, 10000);
        const echoed = await session.read({ nodeId: id("ResultTriggerId"), attributeId: AttributeIds.Value });
        await write([["ResultsAck", DataType.Boolean, true]]);
        await until(false, 10000);
        await write([["ResultsAck", DataType.Boolean, false]]);
        out({ busy: { statuses: busy, lastError: lastError.value.value, echoed: echoed.value.value } });

        const counterNames = ["TriggerCount", "OkCount", "NgCount", "TriggerErrors", "MissedTriggers", "ResultsOverflow"];
        const counters = await session.read(counterNames.map((name) => ({ nodeId: id(name), attributeId: AttributeIds.Value })));
        out({ counters: Object.fromEntries(counterNames.map((name, k) => [name, counters[k].value.value])) });
        await subscription.terminate();
    });
}

run("opcua_cycle", main);
