// A PLC-side OPC UA client (node-opcua, independent of the agent's asyncua) that changes the box's recipe as a
// line's controller does at a product changeover (docs/plc.md, docs/recipes.md):
//   write RecipeSelect = TARGET -> notification RecipeActive = TARGET (subscription, no polling);
//   write RecipeSelect = BAD (no such recipe) -> refused (BadOutOfRange), RecipeActive stays, LastErrorCode 4.
//
// usage: node opcua_recipe.js ENDPOINT USER PASSWORD PKI_DIR SERVER_CERT_DER TARGET BAD
// Prints one JSON object per line: {"initial": n}, {"switch": ...}, {"refused": ...}; exit 0 on success.
"use strict";
const { DataType, AttributeIds } = require("node-opcua-client");
const { out, withSession, watch, run } = require("./opcua_session");

const [endpoint, userName, password, pkiDir, serverCert, target, bad] = process.argv.slice(2);

async function main() {
    await withSession({ endpoint, userName, password, pkiDir, serverCert }, async (session, id) => {
        const { subscription, values: seen, changed } = await watch(session, id("RecipeActive"));
        async function until(value, ms) {
            const deadline = Date.now() + ms;
            while (seen[seen.length - 1] !== value) {
                const left = deadline - Date.now();
                if (left <= 0) throw new Error(`RecipeActive never became ${value} (seen ${seen})`);
                await changed(left);
            }
        }
        const read = async (name) => (await session.read({ nodeId: id(name), attributeId: AttributeIds.Value })).value.value;
        const select = async (index) => (await session.write({
            nodeId: id("RecipeSelect"), attributeId: AttributeIds.Value,
            value: { value: { dataType: DataType.UInt16, value: index } },
        })).name;
        while (seen.length === 0) await new Promise((resolve) => setTimeout(resolve, 10));
        out({ initial: seen[seen.length - 1] });

        const started = process.hrtime.bigint();
        const status = await select(Number(target));
        await until(Number(target), 10000);
        out({ switch: { status, active: seen[seen.length - 1], ms: Number(process.hrtime.bigint() - started) / 1e6 } });

        const refused = await select(Number(bad));
        await new Promise((resolve) => setTimeout(resolve, 300)); // a wrong RecipeActive change would show by now
        out({ refused: {
            status: refused, active: await read("RecipeActive"), notified: seen.slice(-1)[0],
            code: await read("LastErrorCode"), lastError: await read("LastError"),
        } });
        await subscription.terminate();
    });
}

run("opcua_recipe", main);
